using System.Text.Json.Nodes;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Diagnostics;

namespace LocalVllm.Engine;

/// <summary>
/// The offline batch API, as in vLLM: load a model once, then <see cref="Generate(IReadOnlyList{IReadOnlyList{int}}, SamplingParams?, LoraRequest?)"/>
/// runs every prompt through the continuous-batching engine until all finish. Safe to call from several threads:
/// <c>Generate</c> calls run one after another (each call batches its own prompts); for requests from many callers
/// that should batch together, use <see cref="AsyncLlmEngine"/>. <see cref="Dispose"/> stops an in-flight
/// <c>Generate</c> after its current step (it throws <see cref="ObjectDisposedException"/>) and frees the model only
/// once no step can run.
/// </summary>
public sealed class Llm : IDisposable
{
    private readonly object _gate = new();
    private volatile bool _disposeRequested;
    private bool _disposed;

    /// <summary>Loads the model named by <paramref name="options"/>.</summary>
    public Llm(EngineOptions options) => Engine = new LlmEngine(options);

    /// <summary>The engine this API drives; not thread-safe on its own: drive it from one thread, outside <c>Generate</c>.</summary>
    public LlmEngine Engine { get; }

    /// <summary>
    /// Generates for each text prompt (tokenized with the model's tokenizer); outputs come back in prompt order. With
    /// <paramref name="lora"/>, every prompt runs under that adapter (<see cref="EngineOptions.EnableLora"/>).
    /// </summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<string> prompts, SamplingParams? sampling = null, LoraRequest? lora = null)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        return Generate(prompts, Repeat(sampling, prompts.Count), lora is null ? null : Enumerable.Repeat<LoraRequest?>(lora, prompts.Count).ToArray());
    }

    /// <summary>Generates for each text prompt with its own sampling parameters (one per prompt, as vLLM's list form), and its own adapter or none.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<string> prompts, IReadOnlyList<SamplingParams> samplings, IReadOnlyList<LoraRequest?>? loras = null)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        ObjectDisposedException.ThrowIf(_disposeRequested, this);
        return Run(prompts.Select(p => ((IReadOnlyList<int>)Engine.EncodePrompt(p), (string?)p)).ToArray(), samplings, loras);
    }

    /// <summary>Generates for each token-id prompt; outputs come back in prompt order.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<IReadOnlyList<int>> promptTokenIds, SamplingParams? sampling = null, LoraRequest? lora = null)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        return Generate(promptTokenIds, Repeat(sampling, promptTokenIds.Count), lora is null ? null : Enumerable.Repeat<LoraRequest?>(lora, promptTokenIds.Count).ToArray());
    }

    /// <summary>Generates for each token-id prompt with its own sampling parameters (one per prompt), and its own adapter or none.</summary>
    public IReadOnlyList<RequestOutput> Generate(IReadOnlyList<IReadOnlyList<int>> promptTokenIds, IReadOnlyList<SamplingParams> samplings, IReadOnlyList<LoraRequest?>? loras = null)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        return Run(promptTokenIds.Select(p => (p, (string?)null)).ToArray(), samplings, loras);
    }

    /// <summary>
    /// Generates a reply to each conversation (vLLM's <c>LLM.chat</c>): each is rendered with the model's chat template
    /// (<see cref="LlmEngine.RenderChatPrompt"/>) and generated as a prompt of its own, all in one batch; outputs come
    /// back in order, with the rendered text as <see cref="RequestOutput.Prompt"/>. The reply is the model's raw text
    /// (reasoning and tool calls are not parsed out; the chat client does that).
    /// </summary>
    public IReadOnlyList<RequestOutput> Chat(IReadOnlyList<JsonArray> conversations, SamplingParams? sampling = null, ChatPromptOptions? options = null,
        LoraRequest? lora = null)
    {
        ArgumentNullException.ThrowIfNull(conversations);
        ObjectDisposedException.ThrowIf(_disposeRequested, this);
        var prompts = conversations.Select(c => Engine.RenderChatPrompt(c, options)).Select(p => ((IReadOnlyList<int>)p.TokenIds, (string?)p.Text)).ToArray();
        return Run(prompts, Repeat(sampling, prompts.Length), lora is null ? null : Enumerable.Repeat<LoraRequest?>(lora, prompts.Length).ToArray());
    }

    /// <summary>Generates a reply to one conversation; see <see cref="Chat(IReadOnlyList{JsonArray}, SamplingParams?, ChatPromptOptions?, LoraRequest?)"/>.</summary>
    public IReadOnlyList<RequestOutput> Chat(JsonArray messages, SamplingParams? sampling = null, ChatPromptOptions? options = null, LoraRequest? lora = null) =>
        Chat([messages], sampling, options, lora);

    /// <summary>
    /// Each text's embedding (vLLM's <c>LLM.embed</c>): the final hidden state of its last token (or the mean over its
    /// tokens), unit length unless <paramref name="normalize"/> is false; see <see cref="LlmEngine.Embed"/>.
    /// </summary>
    public float[][] Embed(IReadOnlyList<string> texts, EmbeddingPooling pooling = EmbeddingPooling.Last, bool normalize = true)
    {
        ArgumentNullException.ThrowIfNull(texts);
        ObjectDisposedException.ThrowIf(_disposeRequested, this);
        var prompts = texts.Select(t => (IReadOnlyList<int>)Engine.EncodePrompt(t)).ToArray();
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed || _disposeRequested, this);
            return Engine.Embed(prompts, pooling, normalize);
        }
    }

    /// <summary>
    /// Scores texts as vLLM's <c>LLM.score</c> does with an embedding model: the cosine of each pair's embeddings, one
    /// <paramref name="first"/> text against every <paramref name="second"/> text, or pairwise when there are as many.
    /// </summary>
    public double[] Score(IReadOnlyList<string> first, IReadOnlyList<string> second)
    {
        ArgumentNullException.ThrowIfNull(first);
        ArgumentNullException.ThrowIfNull(second);
        if (first.Count != 1 && first.Count != second.Count)
            throw new ArgumentException($"{first.Count} first texts and {second.Count} second texts: give one first text for all, or as many as the second (scored pairwise).", nameof(first));
        return EmbeddingScores.Pairs(Embed([.. first, .. second]), first.Count);
    }

    /// <summary>
    /// Beam search over each text prompt (vLLM's <c>LLM.beam_search</c>): the best <see cref="BeamSearchParams.BeamWidth"/>
    /// sequences per prompt, best first. Each step runs every live beam as a one-token request through the engine, so
    /// with prefix caching on the beams' shared tokens are computed once.
    /// </summary>
    public IReadOnlyList<BeamSearchOutput> BeamSearch(IReadOnlyList<string> prompts, BeamSearchParams beamSearch, LoraRequest? lora = null)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        ObjectDisposedException.ThrowIf(_disposeRequested, this);
        return BeamSearch(prompts.Select(p => ((IReadOnlyList<int>)Engine.EncodePrompt(p), (string?)p)).ToArray(), beamSearch, lora);
    }

    /// <summary>Beam search over each token-id prompt; see <see cref="BeamSearch(IReadOnlyList{string}, BeamSearchParams, LoraRequest?)"/>.</summary>
    public IReadOnlyList<BeamSearchOutput> BeamSearch(IReadOnlyList<IReadOnlyList<int>> promptTokenIds, BeamSearchParams beamSearch, LoraRequest? lora = null)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        return BeamSearch(promptTokenIds.Select(p => (p, (string?)null)).ToArray(), beamSearch, lora);
    }

    private IReadOnlyList<BeamSearchOutput> BeamSearch(IReadOnlyList<(IReadOnlyList<int> Ids, string? Text)> prompts, BeamSearchParams beamSearch, LoraRequest? lora)
    {
        ArgumentNullException.ThrowIfNull(beamSearch);
        beamSearch.Validate(Engine.Validator.MaxLogprobs);
        foreach (var prompt in prompts) Engine.Validator.ValidatePrompt(prompt.Ids);
        return BeamSearcher.RunAsync(prompts, beamSearch, new HashSet<int>(Engine.Directory.EosTokenIds), MaxBeamLength(Engine), Decoder(Engine),
            (beams, sampling) => Task.FromResult(Run(beams.Select(b => ((IReadOnlyList<int>)b, (string?)null)).ToArray(), Enumerable.Repeat(sampling, beams.Count).ToArray(),
                lora is null ? null : Enumerable.Repeat<LoraRequest?>(lora, beams.Count).ToArray())))
            .GetAwaiter().GetResult();
    }

    /// <summary>The longest a beam may grow: one token short of the context and of the whole KV cache.</summary>
    internal static int MaxBeamLength(LlmEngine engine) =>
        Math.Min(engine.MaxModelLen, engine.Validator.KvCacheBlocks * engine.Validator.BlockSize);

    internal static Func<int[], string>? Decoder(LlmEngine engine) =>
        engine.Tokenizer is { } tokenizer ? ids => tokenizer.Decode(ids, skipSpecialTokens: true) : null;

    private IReadOnlyList<SamplingParams> Repeat(SamplingParams? sampling, int count)
    {
        ObjectDisposedException.ThrowIf(_disposeRequested, this);
        var one = sampling ?? Engine.DefaultSamplingParams();
        return Enumerable.Repeat(one, count).ToArray();
    }

    private IReadOnlyList<RequestOutput> Run(IReadOnlyList<(IReadOnlyList<int> Ids, string? Text)> prompts, IReadOnlyList<SamplingParams> samplings,
        IReadOnlyList<LoraRequest?>? loras = null)
    {
        ArgumentNullException.ThrowIfNull(samplings);
        if (samplings.Count != prompts.Count)
            throw new ArgumentException($"{samplings.Count} sampling parameters for {prompts.Count} prompts: give one per prompt, or one for all.", nameof(samplings));
        if (loras is not null && loras.Count != prompts.Count)
            throw new ArgumentException($"{loras.Count} LoRA requests for {prompts.Count} prompts: give one (or null) per prompt.", nameof(loras));
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed || _disposeRequested, this);
            foreach (var sampling in samplings.Distinct()) Engine.Validator.ValidateSampling(sampling); // as given, before the output kind is replaced
            var ids = new List<string>(prompts.Count);
            try
            {
                // Only finished outputs are read: the engine builds nothing per step for these requests.
                for (int i = 0; i < prompts.Count; i++)
                    ids.Add(Engine.AddRequest(prompts[i].Ids, samplings[i] with { OutputKind = RequestOutputKind.FinalOnly }, prompt: prompts[i].Text, lora: loras?[i]));
                var results = new Dictionary<string, RequestOutput>();
                using var progress = ProgressBar.Create(Engine.Options.UseProgressBar, ids.Count);
                while (results.Count < ids.Count)
                {
                    ObjectDisposedException.ThrowIf(_disposeRequested, this);
                    foreach (var o in Engine.Step())
                        if (o.Finished)
                        {
                            results[o.RequestId] = o;
                            progress?.Advance();
                        }
                }
                return ids.Select(id => results[id]).ToArray();
            }
            catch
            {
                // Added requests that did not finish (a rejected prompt, dispose, a failure) leave no blocks behind.
                foreach (var id in ids) Engine.Abort(id);
                throw;
            }
        }
    }

    /// <summary>Stops an in-flight <c>Generate</c> after its current step, then frees the model and the KV cache.</summary>
    public void Dispose()
    {
        _disposeRequested = true;
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            Engine.Dispose();
        }
    }
}
