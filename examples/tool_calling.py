"""Tool calling in-process: Foundry Local's tool-calling sample on foundry-local-py.

The model asks for tools, this script runs them and sends the results back until the model
answers. The first turn sets ``tool_choice`` to ``required`` so that even the 135M default model
calls a tool (larger models, e.g. qwen2.5-0.5b-instruct, do it on their own with ``auto``).
"""

import json

import _bootstrap  # noqa: F401  (only for running straight from a clone)

from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city or location"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Perform a math calculation",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "The expression"}},
                "required": ["expression"],
            },
        },
    },
]


def get_weather(location, unit="celsius"):
    return {"location": location, "temperature": 22 if unit == "celsius" else 72, "unit": unit,
            "condition": "Sunny"}


def calculate(expression):
    if not set(str(expression)) <= set("0123456789+-*/(). "):
        return {"error": "Invalid expression"}
    try:
        return {"expression": expression, "result": eval(expression)}  # noqa: S307 - digits and operators only
    except Exception as e:
        return {"error": str(e)}


tool_functions = {"get_weather": get_weather, "calculate": calculate}


def process_tool_calls(messages, response, client):
    """Run the tools the model asked for and send the results back, until it answers."""
    choice = response.choices[0].message
    while choice.tool_calls:
        messages.append({
            "role": "assistant",
            "content": choice.content,
            "tool_calls": [
                {"id": tc.id, "type": tc.type,
                 "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                for tc in choice.tool_calls
            ],
        })
        for tool_call in choice.tool_calls:
            arguments = json.loads(tool_call.function.arguments)
            print(f"  Tool call: {tool_call.function.name}({arguments})")
            try:
                result = tool_functions[tool_call.function.name](**arguments)
            except TypeError as e:  # a small model may pass arguments the tool does not take
                result = {"error": str(e)}
            messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps(result)})
        client.settings.tool_choice = {"type": "auto"}
        response = client.complete_chat(messages, tools=tools)
        choice = response.choices[0].message
    return choice.content


def main():
    config = Configuration(app_name="foundry_local_samples")
    FoundryLocalManager.initialize(config)
    manager = FoundryLocalManager.instance

    model = manager.catalog.get_model("smollm2-135m")
    model.download(lambda progress: print(f"\rDownloading model: {progress:.2f}%", end="", flush=True))
    print()
    model.load()
    print("Model loaded and ready.")

    client = model.get_chat_client()
    client.settings.max_tokens = 128
    client.settings.temperature = 0.0
    client.settings.tool_choice = {"type": "required"}

    messages = [
        {"role": "system", "content": "You are a helpful assistant with access to tools. "
                                      "Use them when needed to answer questions accurately."},
        {"role": "user", "content": "What is the weather in Seattle?"},
    ]
    print("Sending request with tools...")
    response = client.complete_chat(messages, tools=tools)
    answer = process_tool_calls(messages, response, client)
    print(f"\nAssistant: {answer}")

    model.unload()
    print("Model unloaded.")


if __name__ == "__main__":
    main()
