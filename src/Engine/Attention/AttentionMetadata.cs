using static TorchSharp.torch;

namespace LocalVllm.Engine.Attention;

/// <summary>One sequence's share of a packed step: which query rows it owns and how long its context is.</summary>
/// <param name="QueryStart">First row of this sequence in the packed tokens.</param>
/// <param name="QueryLength">Rows this sequence contributes this step (a prefill chunk, or 1 for decode).</param>
/// <param name="ContextLength">Tokens the sequence attends to after this step's tokens are written (cached + new).</param>
/// <param name="ContextStart">
/// First row of this sequence's context in <see cref="AttentionMetadata.ContextSlots"/>, or -1 when the backend does
/// not read this sequence's context slots (<see cref="IAttentionBackend.ReadsContextSlots"/>) and none were built.
/// </param>
public readonly record struct SequenceSpan(int QueryStart, int QueryLength, int ContextLength, int ContextStart);

/// <summary>
/// What attention needs to know about a packed step: where each new token's K/V goes (slot mapping), each sequence's
/// block table, and, for the sequences whose backend reads them, their block tables expanded to context slots.
/// </summary>
public sealed class AttentionMetadata
{
    /// <summary>Creates metadata; the tensors are owned by the caller's dispose scope.</summary>
    public AttentionMetadata(Tensor slotMapping, Tensor? contextSlots, IReadOnlyList<SequenceSpan> sequences,
        int[][] blockTables, int blockSize)
    {
        SlotMapping = slotMapping;
        ContextSlots = contextSlots;
        Sequences = sequences;
        BlockTables = blockTables;
        BlockSize = blockSize;
        HasAllContextSlots = contextSlots is not null && sequences.All(s => s.ContextStart >= 0);
    }

    /// <summary>[tokens] int64: cache slot (<c>block * blockSize + offset</c>) of every packed token.</summary>
    public Tensor SlotMapping { get; }
    /// <summary>
    /// [sum of built context lengths] int64: the slots of the whole context of each sequence whose span has a
    /// <see cref="SequenceSpan.ContextStart"/>, sequence after sequence; null when no sequence needed them.
    /// </summary>
    public Tensor? ContextSlots { get; }
    /// <summary>Per-sequence spans, in packed order.</summary>
    public IReadOnlyList<SequenceSpan> Sequences { get; }
    /// <summary>Per-sequence block tables (host copy).</summary>
    public int[][] BlockTables { get; }
    /// <summary>Tokens per block.</summary>
    public int BlockSize { get; }

    /// <summary>Whether every sequence's context slots were built into <see cref="ContextSlots"/>.</summary>
    public bool HasAllContextSlots { get; }

    /// <summary>
    /// [contextLength] int64: the context slots of sequence <paramref name="index"/>, a view of <see cref="ContextSlots"/>
    /// when they were built, else computed from its block table (for a backend that reads them only on a fallback path).
    /// </summary>
    public Tensor ContextSlotsOf(int index)
    {
        var s = Sequences[index];
        if (ContextSlots is not null && s.ContextStart >= 0) return ContextSlots.narrow(0, s.ContextStart, s.ContextLength);
        var table = BlockTables[index];
        var slots = new long[s.ContextLength];
        for (int p = 0; p < slots.Length; p++) slots[p] = (long)table[p / BlockSize] * BlockSize + p % BlockSize;
        return tensor(slots, device: SlotMapping.device);
    }
}
