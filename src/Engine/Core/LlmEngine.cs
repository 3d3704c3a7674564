using System.Diagnostics;
using LocalVllm.Engine.Attention;
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
/// The synchronous engine core: requests in, one <see cref="Step"/> at a time (schedule, run the model, sample,
/// post-process), outputs out. Not thread-safe: one thread owns it (<see cref="Llm"/> or the async engine loop).
/// </summary>
public sealed class LlmEngine : IDisposable
{
    private sealed class Request(string id, string? prompt, int[] promptIds, SamplingParams sampling, Sequence[] seqs)
    {
        public string? PinId;
        public DateTimeOffset? Deadline;
        public Exception? Error;
        public readonly string Id = id;
        public readonly string? Prompt = prompt;
        public readonly int[] PromptIds = promptIds;
        public readonly SamplingParams Sampling = sampling;
        public readonly Sequence[] Sequences = seqs;
        public bool Finished => Sequences.All(s => s.Status == SequenceStatus.Finished);
    }

    private readonly Dictionary<string, Request> _requests = [];
    private readonly Dictionary<string, IReadOnlyList<int>> _pins = [];
    private readonly ModelRunner _runner;
    private readonly Sampler _sampler = new();
    private readonly HashSet<int> _eos;
    private long _nextId;

    private readonly ILogger _logger;
    internal ILogger Logger => _logger;

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
        var device = torch.device(options.Device);
        var dtype = options.DType switch
        {
            "bfloat16" => ScalarType.BFloat16,
            "float16" => ScalarType.Float16,
            _ => ScalarType.Float32,
        };
        // On the CPU in float32, decode attention reads the paged cache in place (CpuPagedAttention); elsewhere the
        // device-agnostic TorchSharp backend.
        var attention = options.AttentionBackend
            ?? (device.type == DeviceType.CPU && dtype == ScalarType.Float32 && options.CpuKernels ? new CpuPagedAttention() : new TorchPagedAttention());
        Model = CausalLm.Load(Directory, dtype, device, attention, options.CpuKernels);
        var c = Model.Config;
        MaxModelLen = Math.Min(options.MaxModelLen ?? c.MaxPositionEmbeddings, c.MaxPositionEmbeddings);
        long bytesPerBlock = KvCache.BytesPerBlock(c.NumHiddenLayers, options.BlockSize, c.NumKeyValueHeads, c.HeadDim, dtype);
        int numBlocks = options.NumKvBlocks
            ?? (int)Math.Max(1, Math.Min(int.MaxValue, (options.KvCacheMemoryBytes ?? 256L * 1024 * 1024) / bytesPerBlock));
        Cache = new KvCache(c.NumHiddenLayers, numBlocks, options.BlockSize, c.NumKeyValueHeads, c.HeadDim, dtype, device);
        Blocks = new BlockManager(numBlocks, options.BlockSize, options.EnablePrefixCaching, ModelSalt(c), options.SharedAwareEviction);
        Scheduler = new Scheduler(Blocks, options.MaxNumBatchedTokens, options.MaxNumSeqs, options.DeduplicateSharedPrefixes, options.CacheAwareScheduling);
        _runner = new ModelRunner(Model, Cache) { OnInputsBuilt = ticks => Counters.InputTicks += ticks };
        _eos = [.. Directory.EosTokenIds];
        bool hasTokenizer = Directory.TokenizerJson is not null || Directory.TokenizerModel is not null
            || (Directory.VocabJson is not null && Directory.MergesTxt is not null);
        Tokenizer = hasTokenizer ? ModelTokenizer.Load(Directory) : null;
        ChatTemplate = ChatTemplate.Load(Directory);
        EngineMetrics.Register(this);
        WarmUp(options.PinnedPrefixes.Select(p => (IReadOnlyList<int>)EncodePrompt(p)).Concat(options.PinnedPrefixTokenIds));
    }

    /// <summary>Computes each prefix now and pins its full blocks (used at start-up, before any caller).</summary>
    private void WarmUp(IEnumerable<IReadOnlyList<int>> prefixes)
    {
        int n = 0;
        foreach (var ids in prefixes) AddPinRequest(ids, $"pin-{n++}");
        while (HasUnfinishedRequests) Step();
    }

    /// <summary>
    /// Queues a request that computes <paramref name="prefixTokenIds"/> and, when it finishes, pins the prefix's full
    /// blocks under <paramref name="pinId"/>: they are never evicted until <see cref="Unpin"/>.
    /// </summary>
    public string AddPinRequest(IReadOnlyList<int> prefixTokenIds, string pinId)
    {
        ArgumentException.ThrowIfNullOrEmpty(pinId);
        if (!Blocks.EnablePrefixCaching) throw new InvalidOperationException("Pinning a prefix needs EnablePrefixCaching.");
        if (_pins.ContainsKey(pinId)) throw new ArgumentException($"A prefix is already pinned as '{pinId}'.", nameof(pinId));
        var id = AddRequest(prefixTokenIds, new SamplingParams { Temperature = 0, MaxTokens = 1, IgnoreEos = true });
        _requests[id].PinId = pinId;
        return id;
    }

    /// <summary>Releases a pinned prefix; its blocks stay cached until evicted. Returns false if it was not pinned.</summary>
    public bool Unpin(string pinId)
    {
        if (!_pins.Remove(pinId, out var blocks)) return false;
        Blocks.Unpin(blocks);
        return true;
    }

    /// <summary>The ids of the pinned prefixes.</summary>
    public IReadOnlyCollection<string> PinnedPrefixIds => _pins.Keys;

    public EngineOptions Options { get; }
    public ModelDirectory Directory { get; }
    /// <summary>The model's tokenizer, or null when the directory has no tokenizer files.</summary>
    public ModelTokenizer? Tokenizer { get; }
    /// <summary>The model's chat template, or null when it has none.</summary>
    public ChatTemplate? ChatTemplate { get; }
    public CausalLm Model { get; }
    public KvCache Cache { get; }
    public BlockManager Blocks { get; }
    public Scheduler Scheduler { get; }
    /// <summary>The longest sequence (prompt plus output) the engine serves.</summary>
    public int MaxModelLen { get; }
    /// <summary>Whether any request is still waiting or running.</summary>
    public bool HasUnfinishedRequests => _requests.Count > 0;
    /// <summary>Cumulative counters.</summary>
    public EngineCounters Counters { get; } = new();

    /// <summary>The stats published after the last step (safe to read from any thread).</summary>
    public EngineStats? LastStats { get; private set; }

    /// <summary>A snapshot of queue, cache and token counts (call on the engine's thread).</summary>
    public EngineStats GetStats() => new()
    {
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
        Steps = Counters.Steps,
        FinishedRequests = Counters.FinishedRequests,
    };

    /// <summary>
    /// Validates and queues a request; throws <see cref="ArgumentException"/> naming the bad value and its limit.
    /// Returns the request id.
    /// </summary>
    public string AddRequest(IReadOnlyList<int> promptTokenIds, SamplingParams? sampling = null, string? requestId = null, string? prompt = null,
        DateTimeOffset? deadline = null)
    {
        sampling ??= new SamplingParams();
        requestId ??= $"req-{Interlocked.Increment(ref _nextId)}";
        try
        {
            ValidateRequest(promptTokenIds, sampling);
            if (_requests.ContainsKey(requestId)) throw new ArgumentException($"Request id '{requestId}' is already in use.", nameof(requestId));
            if (Scheduler.NumWaiting + sampling.N > Options.MaxWaitingRequests)
                throw new EngineOverloadedException(
                    $"The engine's waiting queue is full ({Scheduler.NumWaiting} waiting, MaxWaitingRequests = {Options.MaxWaitingRequests}); request '{requestId}' was rejected. Retry later.");
        }
        catch (Exception e)
        {
            EngineLog.Rejected(_logger, requestId, e.Message);
            throw;
        }

        var ids = promptTokenIds.ToArray();
        long now = Stopwatch.GetTimestamp();
        var seqs = Enumerable.Range(0, sampling.N).Select(i => new Sequence(requestId, i, ids, sampling, now)).ToArray();
        _requests[requestId] = new Request(requestId, prompt, ids, sampling, seqs) { Deadline = deadline };
        foreach (var s in seqs)
        {
            if (sampling.PromptLogprobs is not null) s.PromptLogprobs = new PositionLogprobs?[ids.Length];
            if (sampling.Logprobs is not null) s.OutputLogprobs = [];
            if (Tokenizer is not null) s.Detokenizer = new IncrementalDetokenizer(Tokenizer, ids, sampling.SkipSpecialTokens, sampling.Stop);
            Scheduler.Add(s);
        }
        return requestId;
    }

    /// <summary>
    /// Checks a request against the model and cache limits without touching engine state (safe from any thread);
    /// throws <see cref="ArgumentException"/> naming the bad value and its limit.
    /// </summary>
    public void ValidateRequest(IReadOnlyList<int> promptTokenIds, SamplingParams sampling)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        ArgumentNullException.ThrowIfNull(sampling);
        var c = Model.Config;
        sampling.Validate(c.VocabSize);
        if (promptTokenIds.Count == 0) throw new ArgumentException("The prompt is empty: at least one token id is needed.", nameof(promptTokenIds));
        for (int i = 0; i < promptTokenIds.Count; i++)
            if (promptTokenIds[i] < 0 || promptTokenIds[i] >= c.VocabSize)
                throw new ArgumentOutOfRangeException(nameof(promptTokenIds), promptTokenIds[i],
                    $"Token id {promptTokenIds[i]} at prompt position {i} is outside the vocabulary [0, {c.VocabSize}).");
        if (promptTokenIds.Count >= MaxModelLen)
            throw new ArgumentException(
                $"The prompt has {promptTokenIds.Count} tokens but the model's context length is {MaxModelLen} (max_position_embeddings / MaxModelLen); at least one token must be left to generate.",
                nameof(promptTokenIds));
        int capacity = Blocks.NumBlocks * Blocks.BlockSize;
        if (promptTokenIds.Count + 1 > capacity)
            throw new ArgumentException(
                $"The prompt has {promptTokenIds.Count} tokens but the whole KV cache holds {capacity} tokens ({Blocks.NumBlocks} blocks of {Blocks.BlockSize}); raise KvCacheMemoryBytes.",
                nameof(promptTokenIds));
    }

    /// <summary>Aborts a request; its blocks are released at once. Returns its final output, or null if unknown.</summary>
    public RequestOutput? Abort(string requestId)
    {
        if (!_requests.Remove(requestId, out var request)) return null;
        foreach (var s in request.Sequences)
            if (s.Status != SequenceStatus.Finished) Scheduler.Finish(s, FinishReasons.Abort);
        return BuildOutput(request);
    }

    /// <summary>Runs one engine step and returns an output for every request that made progress.</summary>
    public List<RequestOutput> Step()
    {
        var outputs = new List<RequestOutput>();
        if (!HasUnfinishedRequests) return outputs;
        ExpireDeadlines(outputs);
        if (!HasUnfinishedRequests) return outputs;
        using var scope = NewDisposeScope();
        long t0 = Stopwatch.GetTimestamp();
        var batch = Scheduler.Schedule();
        long t1 = Stopwatch.GetTimestamp();
        Counters.ScheduleTicks += t1 - t0;
        if (batch.Count == 0)
        {
            // Nothing fits even alone: the first waiting sequence has outgrown the whole cache.
            var stuck = Scheduler.Unfinished.First();
            Scheduler.Finish(stuck, FinishReasons.Length);
            outputs.AddRange(Collect([stuck]));
            return outputs;
        }
        StepLogits step;
        SampledToken[] sampled = [];
        try
        {
            step = _runner.Run(batch);
            long t2 = Stopwatch.GetTimestamp();
            Counters.ForwardTicks += t2 - t1;
            var samplers = new List<Sequence>();
            var samplerRows = new List<long>();
            for (int i = 0; i < batch.Count; i++)
                if (step.SampleRows[i] >= 0)
                {
                    samplers.Add(batch[i].Sequence);
                    samplerRows.Add(step.SampleRows[i]);
                }
            if (samplers.Count > 0)
            {
                using var rows = tensor(samplerRows.ToArray(), device: step.Logits.device);
                using var sampleLogits = step.Logits.index_select(0, rows);
                sampled = _sampler.Sample(sampleLogits, samplers);
            }
            RecordPromptLogprobs(batch, step);
            Counters.SampleTicks += Stopwatch.GetTimestamp() - t2;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // The forward pass or the sampler failed: the step's requests fail with the cause; the engine carries on.
            foreach (var id in batch.Select(b => b.Sequence.RequestId).Distinct().ToArray())
                outputs.Add(Fail(id, new EngineStepException($"Request '{id}' failed in the engine step: {e.Message}", e)));
            return outputs;
        }

        long now = Stopwatch.GetTimestamp();
        var touched = new List<Sequence>();
        int k = 0;
        for (int i = 0; i < batch.Count; i++)
        {
            var (seq, numNew) = batch[i];
            bool isPrefill = seq.NumComputedTokens < seq.NumPromptTokens;
            if (isPrefill) Counters.PrefillTokens += numNew; else Counters.DecodeTokens += numNew;
            (isPrefill ? EngineMetrics.PrefillTokens : EngineMetrics.DecodeTokens).Add(numNew);
            seq.NumComputedTokens += numNew;
            Blocks.CacheFullBlocks(seq);
            if (step.SampleRows[i] < 0) continue;
            var token = sampled[k++];
            seq.Append(token.TokenId);
            seq.LastTokenTicks = now;
            if (seq.FirstTokenTicks is null)
            {
                seq.FirstTokenTicks = now;
                EngineMetrics.TimeToFirstToken.Record(Stopwatch.GetElapsedTime(seq.ArrivalTicks, now).TotalSeconds);
            }
            if (token.Logprobs is not null) seq.OutputLogprobs!.Add(token.Logprobs);
            try
            {
                CheckStop(seq, token.TokenId);
                touched.Add(seq);
            }
            catch (Exception e)
            {
                // A failure in one request's own processing (detokenizer, stop condition) fails that request only.
                outputs.Add(Fail(seq.RequestId, new RequestFailedException($"Request '{seq.RequestId}' failed while processing its output: {e.Message}", e)));
            }
        }
        Counters.Steps++;
        outputs.AddRange(Collect(touched));
        Counters.OutputTicks += Stopwatch.GetTimestamp() - now;
        LastStats = GetStats();
        EngineMetrics.Publish(this, LastStats);
        return outputs;
    }

    private void ExpireDeadlines(List<RequestOutput> outputs)
    {
        var now = DateTimeOffset.UtcNow;
        foreach (var r in _requests.Values.Where(r => r.Deadline is { } d && d <= now).ToArray())
        {
            foreach (var s in r.Sequences)
                if (s.Status != SequenceStatus.Finished) Scheduler.Finish(s, FinishReasons.Timeout);
            _requests.Remove(r.Id);
            EngineLog.Failed(_logger, r.Id, $"deadline {r.Deadline:O} passed");
            outputs.Add(BuildOutput(r));
        }
    }

    private RequestOutput Fail(string requestId, Exception error)
    {
        var r = _requests[requestId];
        r.Error = error;
        foreach (var s in r.Sequences)
            if (s.Status != SequenceStatus.Finished) Scheduler.Finish(s, FinishReasons.Error);
        _requests.Remove(requestId);
        EngineLog.Failed(_logger, requestId, error.Message);
        return BuildOutput(r);
    }

    private void CheckStop(Sequence seq, int token)
    {
        var p = seq.Sampling;
        int generated = seq.NumOutputTokens;
        if (seq.Detokenizer is { } detok)
        {
            detok.Add(token);
            if (detok.MatchedStop is string matched) { Scheduler.Finish(seq, FinishReasons.Stop, matched); return; }
            if (p.StopCondition is { } stop && stop(detok.Text)) { Scheduler.Finish(seq, FinishReasons.Stop, "StopCondition"); return; }
        }
        if (generated >= p.MinTokens)
        {
            if (!p.IgnoreEos && _eos.Contains(token)) { Scheduler.Finish(seq, FinishReasons.Stop, token); return; }
            if (p.StopTokenIds.Contains(token)) { Scheduler.Finish(seq, FinishReasons.Stop, token); return; }
        }
        if (generated >= p.MaxTokens || seq.NumTokens >= MaxModelLen) Scheduler.Finish(seq, FinishReasons.Length);
    }

    private void RecordPromptLogprobs(IReadOnlyList<ScheduledSequence> batch, StepLogits step)
    {
        for (int i = 0; i < batch.Count; i++)
        {
            if (step.PromptRows[i] is not var (row, position, count)) continue;
            var seq = batch[i].Sequence;
            int k = seq.Sampling.PromptLogprobs ?? 0;
            using var scope = NewDisposeScope();
            var lp = step.Logits.narrow(0, row, count).log_softmax(-1);
            for (int j = 0; j < count; j++)
            {
                int target = position + j + 1;
                seq.PromptLogprobs![target] = Sampler.Logprobs(lp[j], seq.PromptTokenIds[target], k);
            }
        }
    }

    private IEnumerable<RequestOutput> Collect(IEnumerable<Sequence> touched)
    {
        foreach (var id in touched.Select(s => s.RequestId).Distinct())
        {
            if (!_requests.TryGetValue(id, out var request)) continue;
            var output = BuildOutput(request);
            if (output.Finished)
            {
                if (request.PinId is string pin)
                {
                    var blocks = Blocks.CachedBlocksOf(request.PromptIds);
                    Blocks.Pin(blocks);
                    _pins[pin] = blocks;
                }
                _requests.Remove(id);
                Counters.FinishedRequests++;
                EngineMetrics.FinishedRequests.Add(1);
            }
            yield return output;
        }
    }

    private static RequestOutput BuildOutput(Request r)
    {
        var first = r.Sequences.Where(s => s.FirstTokenTicks is not null).Select(s => s.FirstTokenTicks!.Value).DefaultIfEmpty().Min();
        return new RequestOutput
        {
            RequestId = r.Id,
            Prompt = r.Prompt,
            PromptTokenIds = r.PromptIds,
            PromptLogprobs = r.Sequences[0].PromptLogprobs,
            Outputs = r.Sequences.Select(s => new CompletionOutput
            {
                Index = s.Index,
                Text = s.Detokenizer is null ? "" : s.Status == SequenceStatus.Finished ? FinalText(s.Detokenizer) : s.Detokenizer.Text,
                TokenIds = s.OutputTokens(),
                Logprobs = s.OutputLogprobs?.ToArray(),
                FinishReason = s.FinishReason,
                StopReason = s.StopReason,
            }).ToArray(),
            Finished = r.Finished,
            Error = r.Error,
            NumCachedTokens = r.Sequences.Max(s => s.NumCachedPromptTokens),
            TimeToFirstTokenSeconds = first == 0 ? null : Stopwatch.GetElapsedTime(r.Sequences[0].ArrivalTicks, first).TotalSeconds,
            TimePerOutputTokenSeconds = r.Sequences[0] is { NumOutputTokens: > 1, FirstTokenTicks: long f0, LastTokenTicks: long l0 } s0
                ? Stopwatch.GetElapsedTime(f0, l0).TotalSeconds / (s0.NumOutputTokens - 1) : null,
        };
    }

    private static string FinalText(IncrementalDetokenizer d)
    {
        d.Flush();
        return d.Text;
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

    /// <inheritdoc />
    public void Dispose()
    {
        EngineMetrics.Unregister(this);
        Cache.Dispose();
        Model.Dispose();
    }
}
