# Example 2 from 000_2bf5e6a296c248af.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it).
from maestrale import AutoTokenizer, MinistralForCausalLM
model = MinistralForCausalLM.from_pretrained("./tiny-ministral")
tokenizer = AutoTokenizer.from_pretrained("./tiny-ministral")
prompt = "Hey, are you conscious? Can you talk to me?"
inputs = tokenizer(prompt, return_tensors="pt")
# Generate
generate_ids = model.generate(inputs.input_ids, max_length=30)
tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
