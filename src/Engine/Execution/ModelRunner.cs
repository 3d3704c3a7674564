using System.Diagnostics;
using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Diagnostics;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Execution;

/// <summary>
/// Everything between a scheduling decision and the sampled tokens: loads the model on its device and dtype, picks the
/// attention backend, sizes and allocates the KV cache, and each step packs the scheduled tokens into one forward pass
/// (input ids, positions, slot mapping, block tables, and context slots only where the backend reads them), runs the
/// model and samples. It never changes a sequence: the scheduler applies what it returns.
/// </summary>
public sealed class ModelRunner : IDisposable
{
    private readonly Sampler _sampler = new();
    private readonly EngineCounters _counters;

    /// <summary>Loads the model of <paramref name="directory"/> and allocates the KV cache as <paramref name="options"/> say.</summary>
    public ModelRunner(EngineOptions options, ModelDirectory directory, EngineCounters counters)
    {
        _counters = counters;
        var device = torch.device(options.Device);
        var dtype = options.DType switch
        {
            "bfloat16" => ScalarType.BFloat16,
            "float16" => ScalarType.Float16,
            _ => ScalarType.Float32,
        };
        // On the CPU in float32, attention reads the paged cache in place (CpuPagedAttention); elsewhere the
        // device-agnostic TorchSharp backend.
        Attention = options.AttentionBackend
            ?? (device.type == DeviceType.CPU && dtype == ScalarType.Float32 && options.CpuKernels ? new CpuPagedAttention() : new TorchPagedAttention());
        Model = CausalLm.Load(directory, dtype, device, Attention, options.CpuKernels, options.WeightDType, options.Quantization == "int8");
        try
        {
            var c = Model.Config;
            long bytesPerBlock = KvCache.BytesPerBlock(c.NumHiddenLayers, options.BlockSize, c.NumKeyValueHeads, c.HeadDim, dtype);
            KvCacheSizedBy = options.NumKvBlocks is not null ? "NumKvBlocks" : "KvCacheMemoryBytes";
            long budget = options.KvCacheMemoryBytes ?? DefaultKvCacheBytes(device);
            int numBlocks = options.NumKvBlocks ?? (int)Math.Max(1, Math.Min(int.MaxValue, budget / bytesPerBlock));
            KvCacheBytes = numBlocks * bytesPerBlock;
            MaxModelLen = Math.Min(options.MaxModelLen ?? c.MaxPositionEmbeddings, c.MaxPositionEmbeddings);
            long capacity = (long)numBlocks * options.BlockSize;
            if (capacity < MaxModelLen)
            {
                // As vLLM does: a context the cache cannot hold is either lowered (when it came from the model) or refused.
                string need = $"{MaxModelLen} tokens need {(MaxModelLen + options.BlockSize - 1) / options.BlockSize} blocks = {FormatBytes(((long)MaxModelLen + options.BlockSize - 1) / options.BlockSize * bytesPerBlock)}";
                if (options.MaxModelLen is not null)
                    throw new ArgumentException(
                        $"MaxModelLen = {MaxModelLen} does not fit in the KV cache of {numBlocks} blocks = {capacity} tokens ({FormatBytes(KvCacheBytes)}, set by {KvCacheSizedBy}): " +
                        $"{need}. Raise {KvCacheSizedBy} or lower MaxModelLen.", nameof(options));
                MaxModelLenLoweredTo = (int)capacity;
                MaxModelLen = (int)capacity;
            }
            Cache = new KvCache(c.NumHiddenLayers, numBlocks, options.BlockSize, c.NumKeyValueHeads, c.HeadDim, dtype, device);
        }
        catch
        {
            Model.Dispose();
            throw;
        }
    }

    public CausalLm Model { get; }
    public KvCache Cache { get; }
    /// <summary>The paged-attention implementation the model calls.</summary>
    public IAttentionBackend Attention { get; }
    /// <summary>
    /// The longest sequence (prompt plus output) served: MaxModelLen capped by the model's max_position_embeddings and,
    /// when MaxModelLen was not set, by what the KV cache holds.
    /// </summary>
    public int MaxModelLen { get; }
    /// <summary>The context length the cache forced, when it was smaller than the model's (null otherwise).</summary>
    public int? MaxModelLenLoweredTo { get; }
    /// <summary>Bytes of the KV cache.</summary>
    public long KvCacheBytes { get; }
    /// <summary>The option that set the cache's size (NumKvBlocks or KvCacheMemoryBytes), for messages that say what to change.</summary>
    public string KvCacheSizedBy { get; }

    /// <summary>The KV cache's bytes when KvCacheMemoryBytes is not set.</summary>
    public const long DefaultKvCacheCap = 4L << 30;

    /// <summary>
    /// On the CPU: half the memory available once the weights are loaded, capped at <see cref="DefaultKvCacheCap"/>
    /// (vLLM's CPU default) and at least 64 MiB; elsewhere 256 MiB.
    /// </summary>
    private static long DefaultKvCacheBytes(Device device) => DefaultKvCacheBytes(device.type == DeviceType.CPU, HostMemory.AvailableBytes());

    /// <summary>The rule behind the default, for a host with <paramref name="availableBytes"/> free (null: unknown).</summary>
    internal static long DefaultKvCacheBytes(bool cpu, long? availableBytes) =>
        cpu && availableBytes is long available ? Math.Clamp(available / 2, 64L << 20, DefaultKvCacheCap) : 256L << 20;

    internal static string FormatBytes(long bytes) => bytes >= 1L << 30 ? $"{bytes / (double)(1L << 30):F2} GiB" : $"{bytes / (double)(1L << 20):F1} MiB";

    /// <summary>Runs one step: forward pass, then sampling and prompt log-probabilities; tensors stay in the caller's dispose scope.</summary>
    public ModelRunnerOutput Execute(IReadOnlyList<ScheduledSequence> batch)
    {
        long t0 = Stopwatch.GetTimestamp();
        var step = ComputeLogits(batch);
        long t1 = Stopwatch.GetTimestamp();
        _counters.ForwardTicks += t1 - t0;

        var sampled = new SampledToken?[batch.Count];
        var samplers = new List<Sequence>();
        var rows = new List<long>();
        IReadOnlyList<int>?[]? accepted = step.DraftRows is null ? null : new IReadOnlyList<int>?[batch.Count];
        for (int i = 0; i < batch.Count; i++)
            if (step.SampleRows[i] >= 0)
            {
                if (batch[i].Drafts is { } drafts)
                {
                    // The model's distribution after the last token and after each draft, all from this one pass: the
                    // drafts it agrees with stand, and the next token is its own (DraftVerifier).
                    var seq = batch[i].Sequence;
                    var (j, next) = !seq.Sampling.IsGreedy
                        ? DraftVerifier.Sampled(seq.Constraint is { } sampledConstraint
                            ? ConstrainedProbabilities(step.Logits, step.SampleRows[i], seq, sampledConstraint, drafts)
                            : r => Probabilities(step.Logits, step.SampleRows[i] + r, seq.Sampling), drafts, seq.Random)
                        : seq.Constraint is { } constraint
                            ? DraftVerifier.Greedy(ConstrainedChoices(step.Logits, step.SampleRows[i], seq, constraint, drafts), drafts)
                            : DraftVerifier.Greedy(GreedyChoices(step.Logits, step.SampleRows[i], drafts.Length + 1), drafts);
                    accepted![i] = drafts[..j];
                    sampled[i] = new SampledToken(next, null);
                    continue;
                }
                samplers.Add(batch[i].Sequence);
                rows.Add(step.SampleRows[i]);
            }
        if (samplers.Count > 0)
        {
            using var rowsT = tensor(rows.ToArray(), device: step.Logits.device);
            using var sampleLogits = step.Logits.index_select(0, rowsT);
            var tokens = _sampler.Sample(sampleLogits, samplers);
            for (int i = 0, k = 0; i < batch.Count; i++)
                if (step.SampleRows[i] >= 0 && batch[i].Drafts is null) sampled[i] = tokens[k++];
        }
        var promptLogprobs = new PromptLogprobsChunk?[batch.Count];
        for (int i = 0; i < batch.Count; i++)
            if (step.PromptRows[i] is var (row, position, count))
                promptLogprobs[i] = PromptLogprobs(step.Logits, row, position, count, batch[i].Sequence);
        _counters.SampleTicks += Stopwatch.GetTimestamp() - t1;
        return new ModelRunnerOutput(sampled, promptLogprobs, accepted);
    }

    /// <summary>
    /// The probabilities a sampled request draws from at logit row <paramref name="row"/> (temperature, top-k, top-p and
    /// min-p applied, as the sampler does), over the whole vocabulary.
    /// </summary>
    private static float[] Probabilities(Tensor logits, int row, SamplingParams sampling)
    {
        using var scope = NewDisposeScope();
        var sorted = Sampler.FilteredProbabilities(logits.narrow(0, row, 1), [sampling], out var order);
        return zeros_like(sorted).scatter_(1, order, sorted).contiguous().data<float>().ToArray();
    }

    /// <summary>
    /// Row j's probabilities under a structured-output constraint, as the sampler draws from them in a plain step: the
    /// logits of the tokens the grammar does not allow after the first j drafts (a copy of the matcher advanced through
    /// them) set to minus infinity, then temperature, top-k, top-p and min-p. Where nothing is allowed at row 0 (the
    /// proposer's check makes it impossible) the constraint is marked dead and the row is left unmasked, as the sampler does.
    /// </summary>
    private static Func<int, float[]> ConstrainedProbabilities(Tensor logits, int row, Sequence seq, Structured.SequenceConstraint constraint, int[] drafts)
    {
        var matcher = constraint.Matcher.Clone();
        int advanced = 0, vocab = (int)logits.shape[1];
        var words = new ulong[Math.Max((vocab + 63) / 64, matcher.Vocabulary.Words)];
        return j =>
        {
            while (advanced < j) matcher.TryAdvance(drafts[advanced++]); // drafts the proposer checked against the grammar
            constraint.FillAllowed(matcher, words, seq.NumOutputTokens + j >= seq.Sampling.MinTokens, vocab);
            using var scope = NewDisposeScope();
            var x = logits[row + j].to_type(ScalarType.Float32).cpu().data<float>().ToArray();
            var masked = (float[])x.Clone();
            bool any = false;
            for (int t = 0; t < vocab; t++)
                if ((words[t >> 6] & (1UL << t)) == 0) masked[t] = float.NegativeInfinity;
                else any = true;
            if (!any && j == 0) constraint.Dead = true;
            using var rowT = tensor(any ? masked : x).unsqueeze(0);
            var sorted = Sampler.FilteredProbabilities(rowT, [seq.Sampling], out var order);
            return zeros_like(sorted).scatter_(1, order, sorted).contiguous().data<float>().ToArray();
        };
    }

    /// <summary>
    /// Row j's greedy choice under a structured-output constraint: the argmax over the tokens the grammar allows after
    /// the first j drafts (a copy of the matcher advanced through them as the check goes), with the end tokens where
    /// the match is complete and MinTokens is met, as the sampler masks a plain step. -1 when it allows none.
    /// </summary>
    private static Func<int, int> ConstrainedChoices(Tensor logits, int row, Sequence seq, Structured.SequenceConstraint constraint, int[] drafts)
    {
        var matcher = constraint.Matcher.Clone();
        int advanced = 0, vocab = (int)logits.shape[1];
        var words = new ulong[Math.Max((vocab + 63) / 64, matcher.Vocabulary.Words)];
        return j =>
        {
            while (advanced < j) matcher.TryAdvance(drafts[advanced++]); // drafts the proposer checked against the grammar
            constraint.FillAllowed(matcher, words, seq.NumOutputTokens + j >= seq.Sampling.MinTokens, vocab);
            using var r = logits[row + j];
            var x = r.to_type(ScalarType.Float32).cpu().data<float>().ToArray();
            int best = -1;
            for (int w = 0; w < words.Length && w * 64 < vocab; w++)
                for (ulong bits = words[w]; bits != 0; bits &= bits - 1)
                {
                    int t = w * 64 + System.Numerics.BitOperations.TrailingZeroCount(bits);
                    if (t < vocab && (best < 0 || x[t] > x[best])) best = t;
                }
            if (best < 0 && j == 0)
            {
                // Nothing allowed now (the proposer's check makes this impossible, but as the sampler does): the
                // constraint is marked dead and the request fails with that reason when its token is processed.
                constraint.Dead = true;
                best = 0;
                for (int t = 1; t < vocab; t++) if (x[t] > x[best]) best = t;
            }
            return best;
        };
    }

    /// <summary>The argmax of <paramref name="count"/> logit rows from <paramref name="row"/> on.</summary>
    private static int[] GreedyChoices(Tensor logits, int row, int count)
    {
        using var rows = logits.narrow(0, row, count);
        return CpuArgMax.ArgMax(rows).Select(x => (int)x).ToArray();
    }

    /// <summary>Log-probabilities of prompt positions <paramref name="position"/> + 1 .. + <paramref name="count"/> from their preceding rows.</summary>
    private static PromptLogprobsChunk PromptLogprobs(Tensor logits, int row, int position, int count, Sequence seq)
    {
        using var scope = NewDisposeScope();
        int k = seq.Sampling.PromptLogprobs ?? 0;
        var lp = logits.narrow(0, row, count).log_softmax(-1);
        var values = new PositionLogprobs[count];
        for (int j = 0; j < count; j++) values[j] = Sampler.Logprobs(lp[j], seq.PromptTokenIds[position + j + 1], k);
        return new PromptLogprobsChunk(position + 1, values);
    }

    /// <summary>
    /// The final hidden states of <paramref name="seq"/>'s prompt positions <paramref name="start"/> ..
    /// <paramref name="start"/> + <paramref name="count"/>, [count, hidden] float32, in one pass through the paged cache
    /// (its blocks allocated by the caller; the positions before <paramref name="start"/> already computed into them by
    /// earlier calls, as chunked prefill does): what embeddings pool.
    /// </summary>
    public Tensor PromptHiddenStates(Sequence seq, int start, int count)
    {
        int end = start + count, bs = Cache.BlockSize;
        long Slot(int p) => (long)seq.BlockTable[p / bs] * bs + p % bs;
        var ids = new long[count];
        var positions = new long[count];
        var slots = new long[count];
        for (int p = start; p < end; p++)
        {
            ids[p - start] = seq.Tokens[p];
            positions[p - start] = p;
            slots[p - start] = Slot(p);
        }
        bool readsContext = Attention.ReadsContextSlots(count, end);
        var device = Model.Device;
        using var idsT = tensor(ids, device: device);
        using var posT = tensor(positions, device: device);
        using var slotT = tensor(slots, device: device);
        using var ctxT = readsContext ? tensor(Enumerable.Range(0, end).Select(Slot).ToArray(), device: device) : null;
        using var rowsT = arange(count, ScalarType.Int64, device: device);
        var metadata = new AttentionMetadata(slotT, ctxT, [new SequenceSpan(0, count, end, readsContext ? 0 : -1)], [[.. seq.BlockTable]], bs);
        return Model.Forward(idsT, posT, end - 1, metadata, Cache, rowsT, hiddenStates: true);
    }

    /// <summary>Packs the step's tokens and runs the model; the returned logits belong to the caller's dispose scope.</summary>
    public StepLogits ComputeLogits(IReadOnlyList<ScheduledSequence> batch)
    {
        long buildStart = Stopwatch.GetTimestamp();
        int bs = Cache.BlockSize;
        int totalTokens = 0, totalContext = 0;
        var readsContext = new bool[batch.Count];
        for (int i = 0; i < batch.Count; i++)
        {
            var (seq, numNew) = batch[i];
            totalTokens += numNew;
            readsContext[i] = Attention.ReadsContextSlots(numNew, seq.NumComputedTokens + numNew);
            if (readsContext[i]) totalContext += seq.NumComputedTokens + numNew;
        }
        var ids = new long[totalTokens];
        var positions = new long[totalTokens];
        var slots = new long[totalTokens];
        var rowAdapters = batch.Any(b => b.Sequence.Lora is not null) ? new Lora.LoraAdapter?[totalTokens] : null;
        var contextSlots = new long[totalContext];
        var spans = new SequenceSpan[batch.Count];
        var tables = new int[batch.Count][];
        var logitRows = new List<long>();
        var sampleRows = new int[batch.Count];
        var promptRows = new (int, int, int)?[batch.Count];
        int[]? draftRows = null;
        int t = 0, c = 0, maxPosition = 0;
        for (int i = 0; i < batch.Count; i++)
        {
            var (seq, numNew) = batch[i];
            int start = seq.NumComputedTokens, end = start + numNew;
            var table = seq.BlockTable;
            tables[i] = [.. table];
            spans[i] = new SequenceSpan(t, numNew, end, readsContext[i] ? c : -1);
            if (readsContext[i])
            {
                for (int p = 0; p < end; p++) contextSlots[c + p] = (long)table[p / bs] * bs + p % bs;
                c += end;
            }
            if (seq.Sampling.PromptLogprobs is not null && start < seq.NumPromptTokens - 1)
            {
                int last = Math.Min(end, seq.NumPromptTokens - 1);
                promptRows[i] = (logitRows.Count, start, last - start);
                for (int p = start; p < last; p++) logitRows.Add(t + p - start);
            }
            var drafts = batch[i].Drafts;
            for (int p = start; p < end; p++, t++)
            {
                ids[t] = p < seq.NumTokens ? seq.Tokens[p] : drafts![p - seq.NumTokens];
                if (rowAdapters is not null) rowAdapters[t] = seq.Lora;
                positions[t] = p;
                slots[t] = (long)table[p / bs] * bs + p % bs;
            }
            maxPosition = Math.Max(maxPosition, end - 1);
            if (drafts is not null)
            {
                // A row for the last known token and one for each draft: the model's choice after each.
                (draftRows ??= new int[batch.Count])[i] = drafts.Length;
                sampleRows[i] = logitRows.Count;
                for (int p = seq.NumTokens - 1; p < end; p++) logitRows.Add(t - (end - p));
            }
            else if (seq.SamplesAfter(numNew))
            {
                sampleRows[i] = logitRows.Count;
                logitRows.Add(t - 1);
            }
            else sampleRows[i] = -1;
        }

        var device = Model.Device;
        using var idsT = tensor(ids, device: device);
        using var posT = tensor(positions, device: device);
        using var slotT = tensor(slots, device: device);
        using var ctxT = totalContext > 0 ? tensor(contextSlots, device: device) : null;
        using var rowsT = tensor(logitRows.ToArray(), device: device);
        var metadata = new AttentionMetadata(slotT, ctxT, spans, tables, bs);
        _counters.InputTicks += Stopwatch.GetTimestamp() - buildStart;
        var lora = rowAdapters is null ? null : Lora.LoraBatch.For(rowAdapters);
        var logits = Model.Forward(idsT, posT, maxPosition, metadata, Cache, rowsT, false, lora);
        return new StepLogits(logits, sampleRows, promptRows, draftRows);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        Cache.Dispose();
        Model.Dispose();
    }
}
