"""Chat in-process: Foundry Local's chat-completion sample on foundry-local-py.

Same calls as Foundry Local's SDK; only the import differs
(``from foundry_local_sdk import ...`` there).
"""

import _bootstrap  # noqa: F401  (only for running straight from a clone)

from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager


def main():
    # Initialize the SDK: inference runs in this process.
    config = Configuration(app_name="foundry_local_samples")
    FoundryLocalManager.initialize(config)
    manager = FoundryLocalManager.instance

    # Select a model from the catalog, download it (shipped in a wheel: instant), load it.
    model = manager.catalog.get_model("smollm2-135m")
    model.download(lambda progress: print(f"\rDownloading model: {progress:.2f}%", end="", flush=True))
    print()
    model.load()
    print("Model loaded and ready.")

    client = model.get_chat_client()
    client.settings.max_tokens = 64
    client.settings.temperature = 0.0

    messages = [{"role": "user", "content": "Name three colors."}]
    response = client.complete_chat(messages)
    print(f"Assistant: {response.choices[0].message.content}")
    print(f"Tokens: {response.usage.prompt_tokens} prompt, {response.usage.completion_tokens} completion")

    model.unload()
    print("Model unloaded.")


if __name__ == "__main__":
    main()
