"""The web service and the OpenAI client: Foundry Local's web-server sample on foundry-local-py.

``start_web_service()`` serves the whole HTTP API from this process; the model loaded here is the
one it answers with.
"""

import _bootstrap  # noqa: F401  (only for running straight from a clone)
import openai

from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager

config = Configuration(app_name="foundry_local_samples")
FoundryLocalManager.initialize(config)
manager = FoundryLocalManager.instance

model = manager.catalog.get_model("smollm2-135m")
model.download(lambda progress: print(f"\rDownloading model: {progress:.2f}%", end="", flush=True))
print()
model.load()
print("Model loaded.")

manager.start_web_service()
base_url = f"{manager.urls[0]}/v1"
print(f"Serving on {base_url}")

client = openai.OpenAI(base_url=base_url, api_key="none")

response = client.chat.completions.create(
    model=model.id,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the golden ratio?"},
    ],
    max_tokens=96,
    stream=True,
)
for chunk in response:
    if chunk.choices and chunk.choices[0].delta.content is not None:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

model.unload()
manager.stop_web_service()
