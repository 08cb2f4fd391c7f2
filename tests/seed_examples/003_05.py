# Example 5 from 003_cae8d681cbccdca0.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it).
from maestrale import AutoTokenizer, MistralForCausalLM
model = MistralForCausalLM.from_pretrained("./tiny-mistral")
tokenizer = AutoTokenizer.from_pretrained("./tiny-mistral")
prompt = "Hey, are you conscious? Can you talk to me?"
inputs = tokenizer(prompt, return_tensors="pt")
# Generate
generate_ids = model.generate(inputs.input_ids, max_length=30)
tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
