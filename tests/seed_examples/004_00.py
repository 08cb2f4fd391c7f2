# Example 0 from 004_6b70e315729f35fe.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it).
from maestrale import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("./tiny-phi3")
tokenizer = AutoTokenizer.from_pretrained("./tiny-phi3")
messages = [{"role": "user", "content": "Can you provide ways to eat combinations of bananas and dragonfruits?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
outputs = model.generate(inputs, max_new_tokens=32)
text = tokenizer.batch_decode(outputs)[0]
print(text)
