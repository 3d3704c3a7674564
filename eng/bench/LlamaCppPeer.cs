using System.Diagnostics;
using LLama;
using LLama.Common;
using LLama.Native;

namespace LocalVllm.Bench;

/// <summary>
/// llama.cpp through LLamaSharp, configured fairly: F32 weights and KV cache, flash attention off, one KV sequence per
/// request, prompts packed into batches (logits only at each prompt's last token), then one decode call per step with
/// every live sequence, as llama.cpp's batched example does. Greedy.
/// </summary>
internal sealed class LlamaCppPeer : IDisposable
{
    private readonly LLamaWeights _weights;
    private readonly ModelParams _params;

    private static bool _quiet;

    /// <summary>
    /// Loads llama.cpp's native libraries now. The compare bench calls this before libtorch is configured, so that
    /// ggml's OpenMP runtime (the system libgomp, read at load time) keeps its default wait policy while libtorch's own
    /// copy gets the engine's OMP_WAIT_POLICY=PASSIVE: each engine runs with the settings it would have alone.
    /// </summary>
    public static void LoadNative()
    {
        if (!_quiet)
        {
            NativeLibraryConfig.All.WithLogCallback((level, message) => { if (level >= LLamaLogLevel.Error) Console.Error.Write(message); });
            _quiet = true;
        }
        _ = NativeApi.llama_max_devices();
    }

    /// <param name="maxSeqLen">The longest prompt + output of one sequence: each sequence gets a KV stream of this size.</param>
    public LlamaCppPeer(string ggufPath, int threads, uint maxSeqLen, uint maxSeqs)
    {
        LoadNative();
        uint perSeq = (maxSeqLen + 255) / 256 * 256;
        _params = new ModelParams(ggufPath)
        {
            // One KV stream per sequence (not one unified cache that every token would attend over, masked).
            ContextSize = perSeq * maxSeqs, KVUnified = false, BatchSize = 2048, UBatchSize = 512, SeqMax = maxSeqs,
            Threads = threads, BatchThreads = threads, FlashAttention = false, TypeK = GGMLType.GGML_TYPE_F32, TypeV = GGMLType.GGML_TYPE_F32,
            GpuLayerCount = 0,
        };
        _weights = LLamaWeights.LoadFromFile(_params);
    }

    /// <summary>Greedy continuation of one prompt (for the agreement check).</summary>
    public int[] Greedy(int[] prompt, int n) => Run(new Workload("check", [prompt], [n]), out _)[0];

    public int[][] Run(Workload w, out EngineRun figures)
    {
        using var ctx = new LLamaContext(_weights, _params, null);
        var outputs = w.Prompts.Select(_ => new List<int>()).ToArray();
        var batch = new LLamaBatch();
        var wall = Stopwatch.StartNew();
        // Prefill: pack prompts, logits at each prompt's last token.
        var lastLogitIndex = new int[w.Prompts.Length];
        int next = 0;
        while (next < w.Prompts.Length)
        {
            batch.Clear();
            var inBatch = new List<int>();
            while (next < w.Prompts.Length && (batch.TokenCount == 0 || batch.TokenCount + w.Prompts[next].Length <= 2048))
            {
                var p = w.Prompts[next];
                for (int i = 0; i < p.Length; i++)
                    lastLogitIndex[next] = batch.Add(p[i], i, (LLamaSeqId)next, i == p.Length - 1);
                inBatch.Add(next++);
            }
            Check(ctx.Decode(batch));
            foreach (var s in inBatch) outputs[s].Add(Argmax(ctx.NativeHandle.GetLogitsIth(lastLogitIndex[s])));
        }
        double prefill = wall.Elapsed.TotalSeconds;
        // Decode: one call per step with every live sequence.
        var decodeClock = Stopwatch.StartNew();
        while (true)
        {
            batch.Clear();
            var live = new List<(int Seq, int Index)>();
            for (int s = 0; s < w.Prompts.Length; s++)
                if (outputs[s].Count < w.OutLens[s])
                    live.Add((s, batch.Add(outputs[s][^1], w.Prompts[s].Length + outputs[s].Count - 1, (LLamaSeqId)s, true)));
            if (live.Count == 0) break;
            Check(ctx.Decode(batch));
            foreach (var (s, i) in live) outputs[s].Add(Argmax(ctx.NativeHandle.GetLogitsIth(i)));
        }
        figures = new EngineRun("llama.cpp", w.Name, prefill, decodeClock.Elapsed.TotalSeconds, wall.Elapsed.TotalSeconds, w.PromptTokens, w.OutputTokens);
        return outputs.Select(o => o.ToArray()).ToArray();
    }

    /// <summary>The logits at every position of <paramref name="ids"/> (one sequence, fresh context).</summary>
    public float[][] AllLogits(int[] ids)
    {
        using var ctx = new LLamaContext(_weights, _params, null);
        var rows = new float[ids.Length][];
        var batch = new LLamaBatch();
        for (int start = 0; start < ids.Length; start += 512)
        {
            batch.Clear();
            int count = Math.Min(512, ids.Length - start);
            var index = new int[count];
            for (int i = 0; i < count; i++) index[i] = batch.Add(ids[start + i], start + i, (LLamaSeqId)0, true);
            Check(ctx.Decode(batch));
            for (int i = 0; i < count; i++) rows[start + i] = ctx.NativeHandle.GetLogitsIth(index[i]).ToArray();
        }
        return rows;
    }

    private static void Check(DecodeResult r)
    {
        if (r != DecodeResult.Ok) throw new InvalidOperationException($"llama.cpp decode failed: {r}");
    }

    private static int Argmax(Span<float> logits)
    {
        int best = 0;
        for (int i = 1; i < logits.Length; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }

    public void Dispose() => _weights.Dispose();
}
