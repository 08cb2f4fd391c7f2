# Example 5 from 001_56918d541810a2d2.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it).
from maestrale import AutoTokenizer, MixtralForCausalLM
model = MixtralForCausalLM.from_pretrained("./tiny-mixtral")
tokenizer = AutoTokenizer.from_pretrained("./tiny-mixtral")
prompt = "Hey, are you conscious? Can you talk to me?"
inputs = tokenizer(prompt, return_tensors="pt")
# Generate
generate_ids = model.generate(inputs.input_ids, max_length=30)
tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
