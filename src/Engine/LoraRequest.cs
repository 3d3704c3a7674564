namespace LocalVllm.Engine;

/// <summary>
/// A LoRA adapter for a request, as vLLM's <c>LoRARequest</c>: <paramref name="Name"/> (what the server lists and a
/// request's <c>model</c> names), <paramref name="Id"/> (a positive number that identifies the adapter to the engine)
/// and <paramref name="Path"/> (a PEFT adapter folder: <c>adapter_config.json</c> and <c>adapter_model.safetensors</c>).
/// Requests with different adapters run in the same batch; their prompts never share cached blocks.
/// </summary>
public sealed record LoraRequest(string Name, int Id, string Path);
