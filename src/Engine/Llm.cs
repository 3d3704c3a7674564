using LocalVllm.Engine.Core;
using LocalVllm.Engine.Diagnostics;

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

    /// <summary>Generates for each text prompt (tokenized with the model's tokenizer); outputs come back in prompt order.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<string> prompts, SamplingParams? sampling = null)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        return Run(prompts.Select(p => ((IReadOnlyList<int>)Engine.EncodePrompt(p), (string?)p)).ToArray(), sampling);
    }

    /// <summary>Generates for each token-id prompt; outputs come back in prompt order.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<IReadOnlyList<int>> promptTokenIds, SamplingParams? sampling = null)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        return Run(promptTokenIds.Select(p => (p, (string?)null)).ToArray(), sampling);
    }

    private IReadOnlyList<RequestOutput> Run(IReadOnlyList<(IReadOnlyList<int> Ids, string? Text)> prompts, SamplingParams? sampling)
    {
        // Only finished outputs are read: the engine builds nothing per step for these requests.
        sampling ??= new SamplingParams();
        Engine.Validator.ValidateSampling(sampling); // as given, before the output kind is replaced
        var final = sampling with { OutputKind = RequestOutputKind.FinalOnly };
        var ids = new List<string>(prompts.Count);
        try
        {
            foreach (var (p, text) in prompts) ids.Add(Engine.AddRequest(p, final, prompt: text));
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
