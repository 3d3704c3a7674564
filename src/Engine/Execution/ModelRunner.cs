using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Models;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Execution;

/// <summary>Logit rows of one step: which sequences sample and which rows hold prompt positions for prompt logprobs.</summary>
/// <param name="Logits">[rows, vocab] float32.</param>
/// <param name="SampleRows">Per scheduled sequence, its sampling row, or -1 when it does not sample this step.</param>
/// <param name="PromptRows">Per scheduled sequence, (first row, first position, count) of prompt-logprob rows, or null.</param>
public sealed record StepLogits(Tensor Logits, int[] SampleRows, (int Row, int Position, int Count)?[] PromptRows);

/// <summary>
/// Packs a step's scheduled tokens into one forward pass: input ids, positions, slot mapping, the context slots of
/// every sequence's block table, and the rows whose logits are needed.
/// </summary>
public sealed class ModelRunner
{
    private readonly CausalLm _model;
    private readonly KvCache _cache;

    public ModelRunner(CausalLm model, KvCache cache)
    {
        _model = model;
        _cache = cache;
    }

    /// <summary>Called with the Stopwatch ticks spent building each step's inputs (for the engine's time split).</summary>
    public Action<long>? OnInputsBuilt { get; init; }

    /// <summary>Runs the step; the returned logits belong to the caller's dispose scope.</summary>
    public StepLogits Run(IReadOnlyList<ScheduledSequence> batch)
    {
        long buildStart = System.Diagnostics.Stopwatch.GetTimestamp();
        int bs = _cache.BlockSize;
        int totalTokens = 0, totalContext = 0;
        foreach (var s in batch)
        {
            totalTokens += s.NumNewTokens;
            totalContext += s.Sequence.NumComputedTokens + s.NumNewTokens;
        }
        var ids = new long[totalTokens];
        var positions = new long[totalTokens];
        var slots = new long[totalTokens];
        var contextSlots = new long[totalContext];
        var spans = new SequenceSpan[batch.Count];
        var tables = new int[batch.Count][];
        var logitRows = new List<long>();
        var sampleRows = new int[batch.Count];
        var promptRows = new (int, int, int)?[batch.Count];
        int t = 0, c = 0, maxPosition = 0;
        for (int i = 0; i < batch.Count; i++)
        {
            var (seq, numNew) = batch[i];
            int start = seq.NumComputedTokens, end = start + numNew;
            var table = seq.BlockTable;
            tables[i] = [.. table];
            spans[i] = new SequenceSpan(t, numNew, end, c);
            for (int p = 0; p < end; p++) contextSlots[c + p] = (long)table[p / bs] * bs + p % bs;
            c += end;
            if (seq.Sampling.PromptLogprobs is not null && start < seq.NumPromptTokens - 1)
            {
                int last = Math.Min(end, seq.NumPromptTokens - 1);
                promptRows[i] = (logitRows.Count, start, last - start);
                for (int p = start; p < last; p++) logitRows.Add(t + p - start);
            }
            for (int p = start; p < end; p++, t++)
            {
                ids[t] = seq.Tokens[p];
                positions[t] = p;
                slots[t] = contextSlots[spans[i].ContextStart + p];
            }
            maxPosition = Math.Max(maxPosition, end - 1);
            if (seq.SamplesAfter(numNew))
            {
                sampleRows[i] = logitRows.Count;
                logitRows.Add(t - 1);
            }
            else sampleRows[i] = -1;
        }

        var device = _model.Device;
        using var idsT = tensor(ids, device: device);
        using var posT = tensor(positions, device: device);
        using var slotT = tensor(slots, device: device);
        using var ctxT = tensor(contextSlots, device: device);
        using var rowsT = tensor(logitRows.ToArray(), device: device);
        var metadata = new AttentionMetadata(slotT, ctxT, spans, tables, bs);
        OnInputsBuilt?.Invoke(System.Diagnostics.Stopwatch.GetTimestamp() - buildStart);
        var logits = _model.Forward(idsT, posT, maxPosition, metadata, _cache, rowsT);
        return new StepLogits(logits, sampleRows, promptRows);
    }
}
