"""Embeddings in-process: Foundry Local's embeddings sample on foundry-local-py.

Foundry Local's sample uses a dedicated embedding model; here any loaded GGUF model embeds
(mean-pooled, normalised), so the default chat model serves.
"""

import _bootstrap  # noqa: F401  (only for running straight from a clone)

from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager


def main():
    config = Configuration(app_name="foundry_local_samples")
    FoundryLocalManager.initialize(config)
    manager = FoundryLocalManager.instance

    model = manager.catalog.get_model("smollm2-135m")
    model.download(lambda progress: print(f"\rDownloading model: {progress:.2f}%", end="", flush=True))
    print()
    model.load()
    print("Model loaded and ready.")

    client = model.get_embedding_client()

    print("\n--- Single Embedding ---")
    response = client.generate_embedding("The quick brown fox jumps over the lazy dog")
    embedding = response.data[0].embedding
    print(f"Dimensions: {len(embedding)}")
    print(f"First 5 values: {embedding[:5]}")

    print("\n--- Batch Embeddings ---")
    batch_response = client.generate_embeddings([
        "Machine learning is a subset of artificial intelligence",
        "The capital of France is Paris",
        "Rust is a systems programming language",
    ])
    print(f"Number of embeddings: {len(batch_response.data)}")
    for i, data in enumerate(batch_response.data):
        print(f"  [{i}] Dimensions: {len(data.embedding)}")

    model.unload()
    print("\nModel unloaded.")


if __name__ == "__main__":
    main()
