using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Lora;

/// <summary>
/// The adapters of one step's batch and the token rows each covers; after each projection the model asks it to add
/// every adapter's low-rank update to that adapter's rows (rows of requests without one are left as they are).
/// </summary>
internal sealed class LoraBatch : IDisposable
{
    private readonly (LoraAdapter Adapter, Tensor? Rows)[] _groups;
    // Held for the process: a temporary scalar can be finalized while libtorch still reads it (see HeldScalars).
    private static readonly Scalar One = 1.0.ToScalar();

    private LoraBatch((LoraAdapter, Tensor?)[] groups) => _groups = groups;

    /// <summary>The batch's adapters from each token row's adapter (null: the base model); null when no row has one.</summary>
    public static LoraBatch? For(IReadOnlyList<LoraAdapter?> rowAdapters, Device device)
    {
        var groups = rowAdapters.Select((a, row) => (a, row)).Where(x => x.a is not null).GroupBy(x => x.a!).ToList();
        if (groups.Count == 0) return null;
        return new LoraBatch(groups.Select(g => (g.Key, g.Count() == rowAdapters.Count
            ? (Tensor?)null // every row: no gather or scatter
            : tensor(g.Select(x => (long)x.row).ToArray(), device: device))).ToArray());
    }

    /// <summary>Adds <c>B (A x)</c> of each adapted module of <paramref name="projection"/> in <paramref name="layer"/> to its slice of <paramref name="output"/>.</summary>
    public void Apply(int layer, LoraAdapter.Projection projection, Tensor x, Tensor output)
    {
        foreach (var (adapter, rows) in _groups)
        {
            var pieces = adapter.Pieces[layer][(int)projection];
            if (pieces.Length == 0) continue;
            using var scope = NewDisposeScope();
            var input = rows is null ? x : x.index_select(0, rows);
            foreach (var piece in pieces)
            {
                var delta = input.mm(piece.A.t()).mm(piece.B.t()); // [rows, piece size]
                var slice = output.narrow(1, piece.Offset, piece.Size);
                if (rows is null) slice.add_(delta);
                else slice.index_add_(0, rows, delta, One);
            }
        }
    }

    public void Dispose()
    {
        foreach (var (_, rows) in _groups) rows?.Dispose();
    }
}
