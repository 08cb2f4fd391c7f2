# Example 0 from 001_56918d541810a2d2.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it).
from maestrale import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("./tiny-mixtral", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("./tiny-mixtral")
prompt = "My favourite condiment is"
model_inputs = tokenizer([prompt], return_tensors="pt").to(model.device)
generated_ids = model.generate(**model_inputs, max_new_tokens=100, do_sample=True)
tokenizer.batch_decode(generated_ids)[0]
