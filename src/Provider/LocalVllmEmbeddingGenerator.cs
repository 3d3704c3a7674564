using LocalVllm.Engine;
using Microsoft.Extensions.AI;

namespace LocalVllm;

/// <summary>
/// An <see cref="IEmbeddingGenerator{TInput, TEmbedding}"/> over the in-process engine: each text is tokenized as a
/// prompt and its final hidden states pooled (the last token's, unit length, as vLLM's embedding pooler does for
/// decoder embedding models such as Qwen3-Embedding; <c>AdditionalProperties["pooling"] = "mean"</c> and
/// <c>["normalize"] = false</c> change that). It shares the engine with the chat client: the vectors are computed on the
/// engine thread between steps, beside running requests.
/// </summary>
public sealed class LocalVllmEmbeddingGenerator(LocalVllmEngine engine) : IEmbeddingGenerator<string, Embedding<float>>
{
    private readonly EmbeddingGeneratorMetadata _metadata = new("localvllm", LocalVllmChatClient.ProviderUriFor(engine.ModelId), engine.ModelId,
        engine.Engine.Engine.Model.Config.HiddenSize);

    /// <inheritdoc />
    public async Task<GeneratedEmbeddings<Embedding<float>>> GenerateAsync(IEnumerable<string> values, EmbeddingGenerationOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(values);
        var core = engine.Engine.Engine;
        int dimensions = core.Model.Config.HiddenSize;
        if (options?.Dimensions is int wanted && wanted != dimensions)
            throw new NotSupportedException($"Dimensions = {wanted}: this model's embeddings have {dimensions} dimensions (no truncation is offered).");
        var pooling = EmbeddingPooling.Last;
        bool normalize = true;
        foreach (var (key, value) in options?.AdditionalProperties ?? [])
            switch (key)
            {
                case "pooling":
                    pooling = value?.ToString() switch
                    {
                        "last" => EmbeddingPooling.Last,
                        "mean" => EmbeddingPooling.Mean,
                        var other => throw new NotSupportedException($"pooling '{other}' is not one of last, mean."),
                    };
                    break;
                case "normalize":
                    normalize = value is bool b ? b : value is System.Text.Json.JsonElement { ValueKind: System.Text.Json.JsonValueKind.True or System.Text.Json.JsonValueKind.False } e
                        ? e.GetBoolean() : throw new NotSupportedException("normalize must be true or false.");
                    break;
                default:
                    throw new NotSupportedException($"AdditionalProperties key '{key}' is not supported for embeddings; pooling and normalize are.");
            }
        var texts = values.ToList();
        var prompts = texts.Select(t => (IReadOnlyList<int>)core.EncodePrompt(t)).ToList();
        cancellationToken.ThrowIfCancellationRequested();
        var vectors = await engine.Engine.EmbedAsync(prompts, pooling, normalize).ConfigureAwait(false);
        var created = DateTimeOffset.UtcNow;
        var result = new GeneratedEmbeddings<Embedding<float>>(vectors.Select(v => new Embedding<float>(v) { ModelId = engine.ModelId, CreatedAt = created }))
        {
            Usage = new UsageDetails { InputTokenCount = prompts.Sum(p => p.Count), TotalTokenCount = prompts.Sum(p => p.Count) },
        };
        return result;
    }

    /// <inheritdoc />
    public object? GetService(Type serviceType, object? serviceKey = null) =>
        serviceKey is not null ? null
        : serviceType == typeof(EmbeddingGeneratorMetadata) ? _metadata
        : serviceType.IsInstanceOfType(this) ? this
        : serviceType == typeof(LocalVllmEngine) ? engine
        : null;

    /// <inheritdoc />
    public void Dispose()
    {
        // The engine belongs to whoever created it (the DI container, or the caller).
    }
}
