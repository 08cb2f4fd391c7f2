# Example 1 from 004_6b70e315729f35fe.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, hub id -> a tiny local folder (conftest.py builds it).
from maestrale import Phi3Model, Phi3Config
# Initializing a Phi-3 style configuration
configuration = Phi3Config.from_pretrained("./tiny-phi3")
# Initializing a model from the configuration
model = Phi3Model(configuration)
# Accessing the model configuration
configuration = model.config
