namespace LocalVllm.Engine;

/// <summary>
/// The offline batch API, as in vLLM: load a model once, then <see cref="Generate(IReadOnlyList{IReadOnlyList{int}}, SamplingParams?)"/>
/// runs every prompt through the continuous-batching engine until all finish.
/// </summary>
public sealed class Llm : IDisposable
{
    /// <summary>Loads the model named by <paramref name="options"/>.</summary>
    public Llm(EngineOptions options) => Engine = new LlmEngine(options);

    /// <summary>The engine this API drives.</summary>
    public LlmEngine Engine { get; }

    /// <summary>Text prompts need the tokenizer, which a later release wires in.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<string> prompts, SamplingParams? sampling = null) =>
        throw new NotSupportedException("Text prompts need a tokenizer, which is not wired in yet; pass token ids.");

    /// <summary>Generates for each token-id prompt; outputs come back in prompt order.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<IReadOnlyList<int>> promptTokenIds, SamplingParams? sampling = null)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        var ids = new List<string>(promptTokenIds.Count);
        try
        {
            foreach (var p in promptTokenIds) ids.Add(Engine.AddRequest(p, sampling));
        }
        catch
        {
            foreach (var id in ids) Engine.Abort(id);
            throw;
        }
        var results = new Dictionary<string, RequestOutput>();
        using var progress = ProgressBar.Create(Engine.Options.UseProgressBar, ids.Count);
        while (results.Count < ids.Count)
        {
            foreach (var o in Engine.Step())
                if (o.Finished)
                {
                    results[o.RequestId] = o;
                    progress?.Advance();
                }
        }
        return ids.Select(id => results[id]).ToArray();
    }

    /// <inheritdoc />
    public void Dispose() => Engine.Dispose();
}
