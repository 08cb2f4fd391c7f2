# Example 0 from 003_cae8d681cbccdca0.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it), `device` defined.
from maestrale import AutoModelForCausalLM, AutoTokenizer
device = "cpu"
model = AutoModelForCausalLM.from_pretrained("./tiny-mistral", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("./tiny-mistral")
prompt = "My favourite condiment is"
model_inputs = tokenizer([prompt], return_tensors="pt").to(model.device)
model.to(device)
generated_ids = model.generate(**model_inputs, max_new_tokens=100, do_sample=True)
tokenizer.batch_decode(generated_ids)[0]
