# Example 4 from 003_cae8d681cbccdca0.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, config shrunk (the defaults build billions of parameters).
from maestrale import MistralModel, MistralConfig
# Initializing a Mistral 7B style configuration
configuration = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Initializing a model from the Mistral 7B style configuration
model = MistralModel(configuration)
# Accessing the model configuration
configuration = model.config
