using static TorchSharp.torch;

namespace LocalVllm.Engine.Lora;

/// <summary>
/// The adapters of one step's batch as runs of consecutive token rows (the engine orders a batch by adapter, so each
/// adapter's rows are usually one run); after each projection the model asks it to add each run's adapter update to
/// those rows, on views of the step's tensors: no rows are gathered or scattered, and base-model rows are not touched.
/// </summary>
internal sealed class LoraBatch
{
    private readonly (LoraAdapter Adapter, long Start, long Count)[] _runs;

    private LoraBatch((LoraAdapter, long, long)[] runs) => _runs = runs;

    /// <summary>The runs of rows under an adapter, from each token row's adapter (null: the base model); null when no row has one.</summary>
    public static LoraBatch? For(IReadOnlyList<LoraAdapter?> rowAdapters)
    {
        var runs = new List<(LoraAdapter, long, long)>();
        for (int start = 0; start < rowAdapters.Count;)
        {
            var adapter = rowAdapters[start];
            int end = start + 1;
            while (end < rowAdapters.Count && rowAdapters[end] == adapter) end++;
            if (adapter is not null) runs.Add((adapter, start, end - start));
            start = end;
        }
        return runs.Count == 0 ? null : new LoraBatch([.. runs]);
    }

    /// <summary>Adds each run's update of <paramref name="projection"/> in <paramref name="layer"/>, <c>(x A^T) B^T</c>, to its rows of <paramref name="output"/>.</summary>
    public void Apply(int layer, LoraAdapter.Projection projection, Tensor x, Tensor output)
    {
        var runs = new List<(long Start, long Count, Tensor AT, Tensor BT)>(_runs.Length);
        foreach (var (adapter, start, count) in _runs)
            if (adapter.Pairs[layer][(int)projection] is { } pair) runs.Add((start, count, pair.AT, pair.BT));
        if (runs.Count == 0) return;
        // Decode (a few rows in all): every run's rows in one parallel loop in C#.
        if (runs.Sum(r => r.Count) <= Kernels.Cpu.LoraKernel.MaxRows && runs.All(r => Kernels.Cpu.LoraKernel.Supports(x, r.AT, r.BT, output, r.Count)))
        {
            Kernels.Cpu.LoraKernel.AddUpdates(x, output, runs);
            return;
        }
        // Prefill, or tensors the kernel does not take: two libtorch products per run, in place on views of the rows.
        bool whole = runs.Count == 1 && runs[0].Count == x.shape[0];
        foreach (var (start, count, at, bt) in runs)
        {
            using var scope = NewDisposeScope();
            var rows = whole ? x : x.narrow(0, start, count);
            var target = whole ? output : output.narrow(0, start, count);
            using var xa = rows.mm(at); // [rows, R]
            target.addmm_(xa, bt, 1f, 1f);
        }
    }
}
