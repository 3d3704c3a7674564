using LocalVllm.Engine;
using LocalVllm.Engine.Loading.Hub;
using LocalVllm.Engine.Models;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm;

/// <summary>
/// What the chat client needs from an engine: its chat template, its tokenizer, its defaults and a streaming generate.
/// The real implementation is <see cref="LocalVllmEngine"/>; tests substitute scripted output at this seam.
/// </summary>
public interface ILocalVllmEngine
{
    /// <summary>The model id reported in responses.</summary>
    string ModelId { get; }
    /// <summary>The model's chat template.</summary>
    ChatTemplate ChatTemplate { get; }
    /// <summary>The model's sampling defaults (generation_config.json).</summary>
    GenerationConfig Defaults { get; }
    /// <summary>The longest prompt plus output the engine serves.</summary>
    int MaxModelLen { get; }
    /// <summary>Tokenizes a rendered chat prompt (special tokens in the text kept whole; no BOS added: templates carry it).</summary>
    int[] EncodeChatPrompt(string renderedPrompt);
    /// <summary>The engine's request rules; the client checks every request against them before it is queued.</summary>
    RequestValidator Validator { get; }
    /// <summary>
    /// Streams a request's outputs in its <see cref="SamplingParams.OutputKind"/> (the client asks for deltas: each
    /// output holds only the new text and token ids); cancellation aborts it and frees its blocks.
    /// </summary>
    IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string requestId, CancellationToken cancellationToken);
    /// <summary>The LoRA adapters served beside the base model; a request names one by its <see cref="LoraRequest.Name"/> as the model id.</summary>
    IReadOnlyList<LoraRequest> LoraModules => [];
    /// <summary>Streams a request's outputs under a LoRA adapter (null: the base model); see the overload without one.</summary>
    IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string requestId, LoraRequest? lora,
        CancellationToken cancellationToken) =>
        lora is null ? GenerateAsync(promptTokenIds, sampling, requestId, cancellationToken)
            : throw new NotSupportedException($"This engine serves no LoRA adapters ('{lora.Name}' was asked for).");
    /// <summary>Computes and pins a token prefix so it is never evicted; returns its pin id.</summary>
    Task<string> PinAsync(IReadOnlyList<int> prefixTokenIds, CancellationToken cancellationToken);
    /// <summary>Releases a pin.</summary>
    Task<bool> UnpinAsync(string pinId);
}
