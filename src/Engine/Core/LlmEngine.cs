using System.Text.Json.Nodes;
using System.Diagnostics;
using LocalVllm.Engine.Diagnostics;
using LocalVllm.Engine.Execution;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Loading.Hub;
using LocalVllm.Engine.Models;
using LocalVllm.Engine.Text.Templating;
using LocalVllm.Engine.Text.Tokenization;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Core;

/// <summary>
/// The synchronous engine core: requests in, one <see cref="Step"/> at a time (schedule, run, postprocess), outputs
/// out. It wires the parts together and owns nothing they could own themselves. Not thread-safe: one thread owns it
/// (<see cref="Llm"/> or the async engine loop).
/// </summary>
public sealed class LlmEngine : IDisposable
{
    private readonly ModelRunner _runner;
    private readonly OutputProcessor _outputs;
    private readonly Dictionary<string, string> _pendingPins = []; // request id -> pin id, until the request finishes
    private readonly Dictionary<string, IReadOnlyList<int>> _pins = [];
    private readonly ILogger _logger;
    private long _nextId;

    /// <summary>Loads the model and allocates the KV cache as <paramref name="options"/> say; rejected and failed requests are logged to <paramref name="logger"/>.</summary>
    public LlmEngine(EngineOptions options, ILogger? logger = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        TorchRuntime.Configure();
        _logger = logger ?? NullLogger.Instance;
        options.Validate();
        Options = options;
        if (options.NumThreads is int threads) torch.set_num_threads(threads);
        Directory = ModelDirectory.Open(System.IO.Directory.Exists(options.Model) ? options.Model : ModelResolver.Resolve(options.Model, options.Hub));
        _runner = new ModelRunner(options, Directory, Counters);
        SamplingDefaults = ResolveSamplingDefaults(options, Directory);
        var c = Model.Config;
        Blocks = new BlockManager(Cache.NumBlocks, options.BlockSize, options.EnablePrefixCaching, ModelSalt(c), options.SharedAwareEviction);
        Scheduler = new Scheduler(Blocks, options.MaxNumBatchedTokens, options.MaxNumSeqs, options.DeduplicateSharedPrefixes, options.CacheAwareScheduling,
            options.SchedulingPolicy == "priority")
        {
            MaxLoras = options.EnableLora ? options.MaxLoras : int.MaxValue,
            Speculation = options.Speculative is { } spec
                ? new NgramProposer(spec.NumSpeculativeTokens, spec.PromptLookupMin, spec.PromptLookupMax, _runner.MaxModelLen, spec.DisableByBatchSize) : null,
        };
        Validator = new RequestValidator(c.VocabSize, MaxModelLen, Cache.NumBlocks, options.BlockSize, options.MaxWaitingRequests,
            _runner.KvCacheSizedBy, _runner.MaxModelLenLoweredTo is not null, options.MaxLogprobs, options.SchedulingPolicy == "priority");
        EngineLog.KvCache(_logger, Cache.NumBlocks, (long)Cache.NumBlocks * options.BlockSize, ModelRunner.FormatBytes(_runner.KvCacheBytes), _runner.KvCacheSizedBy);
        if (_runner.MaxModelLenLoweredTo is int lowered)
            EngineLog.MaxModelLenLowered(_logger, c.MaxPositionEmbeddings, lowered, _runner.KvCacheSizedBy,
                (c.MaxPositionEmbeddings + options.BlockSize - 1) / options.BlockSize);
        bool hasTokenizer = Directory.TokenizerJson is not null || Directory.TokenizerModel is not null
            || (Directory.VocabJson is not null && Directory.MergesTxt is not null);
        Tokenizer = hasTokenizer ? ModelTokenizer.Load(Directory) : null;
        ChatTemplate = Text.Templating.ChatTemplate.Load(Directory.Path, options.ChatTemplate);
        if (Tokenizer is { } tok) _vocabulary = new Lazy<Structured.TokenVocabulary>(() => new Structured.TokenVocabulary(tok, Math.Max(c.VocabSize, tok.Count)));
        _outputs = new OutputProcessor(Scheduler, Tokenizer, new HashSet<int>(Directory.EosTokenIds), MaxModelLen, Counters, _logger,
            _vocabulary is null ? null : () => _vocabulary.Value, options.EnableJumpForward, options.StreamInterval, options.Seed);
        EngineMetrics.Register(this);
        WarmUp(options.PinnedPrefixes.Select(p => (IReadOnlyList<int>)EncodePrompt(p)).Concat(options.PinnedPrefixTokenIds));
    }

    private readonly Lazy<Structured.TokenVocabulary>? _vocabulary;

    /// <summary>
    /// The sampling defaults requests get where they leave a setting unset: the model's generation_config.json, or
    /// none, or another folder's (<see cref="EngineOptions.GenerationConfig"/>), with
    /// <see cref="EngineOptions.OverrideGenerationConfig"/> laid over them. Its ids are always the model's.
    /// </summary>
    public GenerationConfig SamplingDefaults { get; }

    private static GenerationConfig ResolveSamplingDefaults(EngineOptions options, ModelDirectory directory)
    {
        var source = options.GenerationConfig switch
        {
            "auto" => directory.Generation,
            "vllm" => new GenerationConfig(),
            var folder => GenerationConfig.Load(System.IO.Path.Combine(folder, "generation_config.json")),
        };
        var defaults = directory.Generation.WithSamplingOf(source);
        return options.OverrideGenerationConfig is { Count: > 0 } overrides ? defaults.Override(overrides) : defaults;
    }

    /// <summary>
    /// Sampling parameters from <see cref="SamplingDefaults"/> (vLLM's <c>get_default_sampling_params</c>): with
    /// <c>do_sample</c>, its temperature, top-p, top-k and min-p; its repetition penalty and <c>max_new_tokens</c> in any
    /// case; the rest as <see cref="SamplingParams"/>' own defaults. What <c>Llm.Generate</c> uses when given none.
    /// </summary>
    public SamplingParams DefaultSamplingParams()
    {
        var d = SamplingDefaults;
        var p = new SamplingParams { RepetitionPenalty = d.RepetitionPenalty ?? 1f, MaxTokens = d.MaxNewTokens ?? 16 };
        return d.DoSample ? p with { Temperature = d.Temperature ?? 1f, TopP = d.TopP ?? 1f, TopK = d.TopK ?? 0, MinP = d.MinP ?? 0f } : p;
    }

    /// <summary>The vocabulary as bytes for structured outputs (built on first use), or null without a tokenizer.</summary>
    public Structured.TokenVocabulary? Vocabulary => _vocabulary?.Value;

    public EngineOptions Options { get; }
    public ModelDirectory Directory { get; }
    /// <summary>The model's tokenizer, or null when the directory has no tokenizer files.</summary>
    public ModelTokenizer? Tokenizer { get; }
    /// <summary>The model's chat template, or null when it has none.</summary>
    public ChatTemplate? ChatTemplate { get; }
    public CausalLm Model => _runner.Model;
    public KvCache Cache => _runner.Cache;
    public ModelRunner Runner => _runner;
    public BlockManager Blocks { get; }
    public Scheduler Scheduler { get; }
    /// <summary>The rules every request is checked against before it is queued (safe to call from any thread).</summary>
    public RequestValidator Validator { get; }
    /// <summary>The longest sequence (prompt plus output) the engine serves.</summary>
    public int MaxModelLen => _runner.MaxModelLen;
    internal ILogger Logger => _logger;
    /// <summary>Whether any request is still waiting or running.</summary>
    public bool HasUnfinishedRequests => _outputs.Count > 0;
    /// <summary>Cumulative counters.</summary>
    public EngineCounters Counters { get; } = new();
    /// <summary>The stats published after the last step (safe to read from any thread).</summary>
    public EngineStats? LastStats { get; private set; }
    /// <summary>The ids of the pinned prefixes.</summary>
    public IReadOnlyCollection<string> PinnedPrefixIds => _pins.Keys;

    /// <summary>
    /// Validates and queues a request; throws <see cref="ArgumentException"/> naming the bad value and its limit, or
    /// <see cref="EngineOverloadedException"/> when the waiting queue is full. Returns the request id.
    /// </summary>
    public string AddRequest(IReadOnlyList<int> promptTokenIds, SamplingParams? sampling = null, string? requestId = null, string? prompt = null,
        DateTimeOffset? deadline = null, LoraRequest? lora = null)
    {
        sampling ??= new SamplingParams();
        requestId ??= $"req-{Interlocked.Increment(ref _nextId)}";
        Lora.LoraAdapter? adapter = null;
        try
        {
            var truncated = Validator.Truncate(promptTokenIds, sampling);
            if (truncated.Count != promptTokenIds.Count) prompt = null; // the text no longer matches the ids
            promptTokenIds = truncated;
            Validator.Validate(promptTokenIds, sampling);
            if (_outputs.Contains(requestId)) throw new ArgumentException($"Request id '{requestId}' is already in use.", nameof(requestId));
            Validator.CheckQueue(Scheduler.NumWaiting, sampling, requestId);
            if (lora is not null) adapter = Adapter(lora);
        }
        catch (Exception e)
        {
            EngineLog.Rejected(_logger, requestId, e.Message);
            throw;
        }
        _outputs.Add(requestId, promptTokenIds, sampling, prompt, deadline, adapter);
        return requestId;
    }

    private readonly Dictionary<int, Lora.LoraAdapter> _loras = [];
    private long _loraUses;

    /// <summary>
    /// Loads a LoRA adapter ahead of its first request (vLLM's <c>add_lora</c>); a request naming one loads it too.
    /// Throws naming what does not fit (the folder, the rank, a module, a shape, an id already used for another adapter).
    /// </summary>
    public void AddLora(LoraRequest lora) => Adapter(lora);

    /// <summary>Drops a loaded adapter (vLLM's <c>remove_lora</c>); false when none has that id. An adapter that live requests use is kept until they end.</summary>
    public bool RemoveLora(int id)
    {
        if (!_loras.TryGetValue(id, out var adapter)) return false;
        if (InUse(adapter)) throw new InvalidOperationException($"LoRA adapter '{adapter.Request.Name}' (id {id}) is in use by live requests; abort them or wait for them to end.");
        _loras.Remove(id);
        adapter.Dispose();
        return true;
    }

    /// <summary>The adapters loaded now (vLLM's <c>list_loras</c>).</summary>
    public IReadOnlyList<LoraRequest> ListLoras() => _loras.Values.Select(a => a.Request).OrderBy(r => r.Id).ToArray();

    private string[] LoraNames(SequenceStatus status) =>
        [.. Scheduler.Unfinished.Where(s => s.Status == status && s.Lora is not null).Select(s => s.Lora!.Request.Name).Distinct().Order(StringComparer.Ordinal)];

    private bool InUse(Lora.LoraAdapter adapter) => Scheduler.Unfinished.Any(s => s.Lora == adapter);

    /// <summary>The loaded adapter for <paramref name="lora"/>, loading it (and dropping the least recently used idle one past MaxCpuLoras) if needed.</summary>
    private Lora.LoraAdapter Adapter(LoraRequest lora)
    {
        ArgumentNullException.ThrowIfNull(lora);
        if (!Options.EnableLora)
            throw new ArgumentException($"Request asks for LoRA adapter '{lora.Name}', but LoRA is off: set EngineOptions.EnableLora (--enable-lora).", nameof(lora));
        if (_loras.TryGetValue(lora.Id, out var loaded))
        {
            if (loaded.Request.Name != lora.Name || Path.GetFullPath(loaded.Request.Path) != Path.GetFullPath(lora.Path))
                throw new ArgumentException($"LoRA id {lora.Id} is already loaded as '{loaded.Request.Name}' from '{loaded.Request.Path}'; give '{lora.Name}' another id.", nameof(lora));
            loaded.LastUsedStep = ++_loraUses;
            return loaded;
        }
        // A folder, or a hub repository id (owner/name[@revision]) fetched into the model cache, as vLLM resolves adapters.
        string folder = System.IO.Directory.Exists(lora.Path) || !ModelResolver.IsRepoId(lora.Path) ? lora.Path : ModelResolver.ResolveAdapter(lora.Path, Options.Hub);
        var adapter = Lora.LoraAdapter.Load(lora, Model.Config, Model.DType, Model.Device, Options.MaxLoraRank, folder);
        int cap = Options.MaxCpuLoras ?? Options.MaxLoras;
        foreach (var idle in _loras.Values.Where(a => !InUse(a)).OrderBy(a => a.LastUsedStep).Take(Math.Max(0, _loras.Count + 1 - cap)).ToList())
        {
            _loras.Remove(idle.Request.Id);
            idle.Dispose();
        }
        adapter.LastUsedStep = ++_loraUses;
        _loras[lora.Id] = adapter;
        EngineLog.LoraLoaded(_logger, lora.Name, lora.Id, adapter.Rank, lora.Path);
        return adapter;
    }

    /// <summary>Aborts a request; its blocks are released at once. Returns its final output, or null if unknown.</summary>
    public RequestOutput? Abort(string requestId)
    {
        _pendingPins.Remove(requestId);
        return _outputs.Abort(requestId);
    }

    /// <summary>Runs one engine step and returns an output for every request that made progress (as its output kind says).</summary>
    public List<RequestOutput> Step()
    {
        if (!HasUnfinishedRequests) return [];
        var outputs = _outputs.ExpireDeadlines();
        if (!HasUnfinishedRequests) return outputs;
        using var scope = NewDisposeScope();

        // Schedule: which sequences compute how many tokens, within the token budget and the free blocks.
        long t0 = Stopwatch.GetTimestamp();
        var batch = Scheduler.Schedule();
        Counters.ScheduleTicks += Stopwatch.GetTimestamp() - t0;
        if (batch.Count == 0)
        {
            // Nothing fits even alone: the first waiting sequence has outgrown the whole cache.
            outputs.AddRange(_outputs.FinishStuck(Scheduler.Unfinished.First()));
            return PinFinished(outputs);
        }

        // Under LoRA, the batch is ordered by adapter (stably): each adapter's rows then sit side by side, and its update
        // is two products over one run of rows.
        if (_loras.Count > 0 && batch.Any(b => b.Sequence.Lora is not null))
            batch = [.. batch.OrderBy(b => b.Sequence.Lora?.Request.Id ?? 0)];

        // Run: one forward pass over the packed batch, then sampling.
        ModelRunnerOutput result;
        try
        {
            result = _runner.Execute(batch);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            outputs.AddRange(_outputs.FailStep(batch, e));
            return PinFinished(outputs);
        }

        // Postprocess: the scheduler applies the results; the output processor detokenizes, checks stops, builds outputs.
        long t1 = Stopwatch.GetTimestamp();
        var (prefill, decode) = Scheduler.Update(batch, result.Sampled, result.AcceptedDrafts);
        Counters.PrefillTokens += prefill;
        Counters.DecodeTokens += decode;
        EngineMetrics.PrefillTokens.Add(prefill);
        EngineMetrics.DecodeTokens.Add(decode);
        outputs.AddRange(_outputs.Process(batch, result));
        PinFinished(outputs);
        Counters.Steps++;
        Counters.OutputTicks += Stopwatch.GetTimestamp() - t1;
        LastStats = GetStats();
        EngineMetrics.Publish(this, LastStats);
        return outputs;
    }

    /// <summary>
    /// Embeddings of <paramref name="prompts"/> (token ids): each prompt's final hidden states (after the model's last
    /// norm) pooled as <paramref name="pooling"/> says and, with <paramref name="normalize"/>, scaled to unit length
    /// (vLLM's embedding pooler). Each prompt runs through the paged cache in chunks of at most MaxNumBatchedTokens
    /// tokens (a long input never makes one huge pass), in blocks taken from the free pool and given back at once
    /// (nothing enters the prefix cache); called on the engine's thread between steps.
    /// Throws <see cref="ArgumentException"/> for an empty or too long prompt or a token outside the vocabulary, and
    /// <see cref="EngineOverloadedException"/> when the free blocks cannot hold a prompt now.
    /// </summary>
    public float[][] Embed(IReadOnlyList<IReadOnlyList<int>> prompts, EmbeddingPooling pooling = EmbeddingPooling.Last, bool normalize = true)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        var result = new float[prompts.Count][];
        int vocab = Model.Config.VocabSize;
        for (int i = 0; i < prompts.Count; i++)
        {
            var ids = prompts[i];
            if (ids.Count == 0) throw new ArgumentException($"Embedding input {i} is empty.", nameof(prompts));
            if (ids.Count > MaxModelLen)
                throw new ArgumentException($"Embedding input {i} has {ids.Count} tokens, more than the context length of {MaxModelLen}.", nameof(prompts));
            foreach (int t in ids)
                if (t < 0 || t >= vocab) throw new ArgumentException($"Embedding input {i} holds token id {t}, outside the vocabulary (0..{vocab - 1}).", nameof(prompts));
            var seq = new Sequence($"embed-{Interlocked.Increment(ref _nextId)}", 0, [.. ids], new SamplingParams { MaxTokens = 1 }, 0);
            if (!Blocks.CanAllocate(seq, [], ids.Count))
                throw new EngineOverloadedException($"The KV cache has no room for a {ids.Count}-token embedding input now ({Blocks.NumFreeBlocks} free blocks); retry later.");
            Blocks.Allocate(seq, [], ids.Count);
            try
            {
                using var scope = NewDisposeScope();
                Tensor? sum = null, last = null;
                for (int start = 0; start < ids.Count; start += Options.MaxNumBatchedTokens)
                {
                    int count = Math.Min(Options.MaxNumBatchedTokens, ids.Count - start);
                    var hidden = _runner.PromptHiddenStates(seq, start, count); // [count, hidden]
                    if (pooling == EmbeddingPooling.Mean) sum = sum is null ? hidden.sum([0]) : sum + hidden.sum([0]);
                    last = hidden[count - 1];
                }
                var pooled = pooling == EmbeddingPooling.Mean ? sum! / ids.Count : last!;
                if (normalize) pooled = pooled / pooled.norm().clamp_min(1e-12);
                result[i] = pooled.contiguous().data<float>().ToArray();
            }
            finally
            {
                Blocks.Free(seq);
            }
        }
        return result;
    }

    /// <summary>A snapshot of queue, cache and token counts (call on the engine's thread).</summary>
    public EngineStats GetStats() => new()
    {
        MaxLoras = Options.EnableLora ? Options.MaxLoras : null,
        RunningLoraAdapters = Options.EnableLora ? LoraNames(SequenceStatus.Running) : [],
        WaitingLoraAdapters = Options.EnableLora ? LoraNames(SequenceStatus.Waiting) : [],
        Running = Scheduler.NumRunning,
        Waiting = Scheduler.NumWaiting,
        KvBlocksTotal = Blocks.NumBlocks,
        KvBlocksUsed = Blocks.NumUsedBlocks,
        KvBlocksFree = Blocks.NumFreeBlocks - Blocks.NumCachedFreeBlocks,
        KvBlocksCached = Blocks.NumCachedFreeBlocks,
        KvBlocksPinned = Blocks.NumPinnedBlocks,
        Evictions = Blocks.NumEvictions,
        DeferredForSharedPrefix = Scheduler.NumDeferredForSharedPrefix,
        PromptTokens = Scheduler.AdmittedPromptTokens,
        PrefixCacheHitTokens = Scheduler.CachedPromptTokens,
        PrefillTokens = Counters.PrefillTokens,
        DecodeTokens = Counters.DecodeTokens,
        Preemptions = Scheduler.NumPreemptions,
        SpecDraftTokens = Scheduler.NumDraftTokens,
        SpecAcceptedTokens = Scheduler.NumAcceptedDraftTokens,
        Steps = Counters.Steps,
        FinishedRequests = Counters.FinishedRequests,
    };

    /// <summary>
    /// Queues a request that computes <paramref name="prefixTokenIds"/> and, when it finishes, pins the prefix's full
    /// blocks under <paramref name="pinId"/>: they are never evicted until <see cref="Unpin"/>.
    /// </summary>
    public string AddPinRequest(IReadOnlyList<int> prefixTokenIds, string pinId)
    {
        ArgumentException.ThrowIfNullOrEmpty(pinId);
        if (!Blocks.EnablePrefixCaching) throw new InvalidOperationException("Pinning a prefix needs EnablePrefixCaching.");
        if (_pins.ContainsKey(pinId) || _pendingPins.ContainsValue(pinId)) throw new ArgumentException($"A prefix is already pinned as '{pinId}'.", nameof(pinId));
        var id = AddRequest(prefixTokenIds, new SamplingParams { Temperature = 0, MaxTokens = 1, IgnoreEos = true, OutputKind = RequestOutputKind.FinalOnly });
        _pendingPins[id] = pinId;
        return id;
    }

    /// <summary>Releases a pinned prefix; its blocks stay cached until evicted. Returns false if it was not pinned.</summary>
    public bool Unpin(string pinId)
    {
        if (!_pins.Remove(pinId, out var blocks)) return false;
        Blocks.Unpin(blocks);
        return true;
    }

    /// <summary>Pins the prompt blocks of pin requests that finished normally in <paramref name="outputs"/>.</summary>
    private List<RequestOutput> PinFinished(List<RequestOutput> outputs)
    {
        foreach (var o in outputs)
            if (o.Finished && _pendingPins.Remove(o.RequestId, out var pinId)
                && o.Outputs.All(c => c.FinishReason is FinishReasons.Stop or FinishReasons.Length))
            {
                var blocks = Blocks.CachedBlocksOf(o.PromptTokenIds);
                Blocks.Pin(blocks);
                _pins[pinId] = blocks;
            }
        return outputs;
    }

    /// <summary>
    /// Computes each prefix now, synchronously, and pins its full blocks; returns the pin ids (for <see cref="Unpin"/>).
    /// For start-up, before the engine serves callers: it steps the engine until nothing is unfinished, so it must not
    /// be called while another thread (an <see cref="AsyncLlmEngine"/> loop) drives this engine.
    /// </summary>
    public IReadOnlyList<string> WarmUp(IEnumerable<IReadOnlyList<int>> prefixes)
    {
        ArgumentNullException.ThrowIfNull(prefixes);
        var pins = new List<string>();
        foreach (var ids in prefixes)
        {
            var pinId = $"startup-pin-{_startupPins++}";
            AddPinRequest(ids, pinId);
            pins.Add(pinId);
        }
        while (HasUnfinishedRequests) Step();
        return pins;
    }

    private int _startupPins;

    /// <summary>
    /// A conversation (a JSON array of {role, content, tool_calls...} messages) as the prompt the model sees: rendered with
    /// the chat template and tokenized without adding special tokens (the template writes its own), as vLLM's
    /// <c>LLM.chat</c> and chat completions do.
    /// </summary>
    public (string Text, int[] TokenIds) RenderChatPrompt(JsonArray messages, ChatPromptOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        options ??= new ChatPromptOptions();
        if (ChatTemplate is null)
            throw new NotSupportedException($"The model directory '{Directory.Path}' has no chat template (tokenizer_config.json's chat_template or chat_template.jinja); " +
                                            "give one with EngineOptions.ChatTemplate (--chat-template), or send text or token-id prompts.");
        if (Tokenizer is null)
            throw new NotSupportedException($"The model directory '{Directory.Path}' has no tokenizer files; a chat needs one.");
        for (int i = 0; i < messages.Count; i++)
            if (messages[i] is not JsonObject m || m["role"] is not JsonValue role || role.GetValueKind() != System.Text.Json.JsonValueKind.String)
                throw new ArgumentException($"Message {i} is not an object with a string 'role'.", nameof(messages));
        if (options.ContinueFinalMessage && options.AddGenerationPrompt == true)
            throw new ArgumentException("ContinueFinalMessage and AddGenerationPrompt cannot both be true: a continued final message takes no generation prompt after it.", nameof(options));
        bool generation = options.AddGenerationPrompt ?? !options.ContinueFinalMessage;
        var text = ChatTemplate.Render(messages, options.Tools, generation, options.ChatTemplateKwargs);
        if (options.ContinueFinalMessage) text = ChatTemplate.ContinueFinalMessage(text, messages);
        return (text, Tokenizer.Encode(text, addSpecialTokens: false));
    }

    /// <summary>Encodes a text prompt with the model's tokenizer (special tokens in the text kept whole, BOS as configured).</summary>
    public int[] EncodePrompt(string prompt)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        if (Tokenizer is null)
            throw new NotSupportedException($"The model directory '{Directory.Path}' has no tokenizer files (tokenizer.json, vocab.json + merges.txt or tokenizer.model); pass token ids instead.");
        return Tokenizer.Encode(prompt);
    }

    private static ulong ModelSalt(ModelConfig c) =>
        System.IO.Hashing.XxHash64.HashToUInt64(System.Text.Encoding.UTF8.GetBytes(
            $"{c.Architecture}/{c.VocabSize}/{c.HiddenSize}/{c.NumHiddenLayers}/{c.NumAttentionHeads}/{c.NumKeyValueHeads}/{c.HeadDim}"));

    /// <summary>
    /// Called at the start of every <see cref="Dispose"/>, on the disposing thread, while the pool is still intact. The
    /// test assemblies set it once (a module initializer) to check the KV pool's invariants against the live sequences,
    /// so every test that builds an engine is checked without having to remember to.
    /// </summary>
    internal static Action<LlmEngine>? DisposingHook;

    /// <inheritdoc />
    public void Dispose()
    {
        DisposingHook?.Invoke(this);
        EngineMetrics.Unregister(this);
        _runner.Dispose();
        foreach (var adapter in _loras.Values) adapter.Dispose();
        _loras.Clear();
    }
}
