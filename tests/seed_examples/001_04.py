# Example 4 from 001_56918d541810a2d2.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, config shrunk (the defaults build billions of parameters).
from maestrale import MixtralModel, MixtralConfig
# Initializing a Mixtral 7B style configuration
configuration = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Initializing a model from the Mixtral 7B style configuration
model = MixtralModel(configuration)
# Accessing the model configuration
configuration = model.config
