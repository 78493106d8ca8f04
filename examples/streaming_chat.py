"""Streaming chat in-process: Foundry Local's native-chat-completions sample on foundry-local-py."""

import _bootstrap  # noqa: F401  (only for running straight from a clone)

from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager


def main():
    config = Configuration(app_name="foundry_local_samples")
    FoundryLocalManager.initialize(config)
    manager = FoundryLocalManager.instance

    # Execution providers: Foundry Local downloads them; here they come with pip extras, and this
    # reports the ones this machine can use through the same callback.
    current_ep = ""

    def ep_progress(ep_name: str, percent: float):
        nonlocal current_ep
        if ep_name != current_ep:
            if current_ep:
                print()
            current_ep = ep_name
        print(f"\r  {ep_name:<30}  {percent:5.1f}%", end="", flush=True)

    manager.download_and_register_eps(progress_callback=ep_progress)
    if current_ep:
        print()

    model = manager.catalog.get_model("smollm2-135m")
    model.download(lambda progress: print(f"\rDownloading model: {progress:.2f}%", end="", flush=True))
    print()
    model.load()
    print("Model loaded and ready.")

    client = model.get_chat_client()
    client.settings.max_tokens = 96

    messages = [{"role": "user", "content": "What is the golden ratio?"}]
    print("Assistant: ", end="", flush=True)
    for chunk in client.complete_streaming_chat(messages):
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            print(content, end="", flush=True)
    print()

    model.unload()
    print("Model unloaded.")


if __name__ == "__main__":
    main()
