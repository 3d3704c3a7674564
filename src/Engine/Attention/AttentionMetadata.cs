using static TorchSharp.torch;

namespace LocalVllm.Engine.Attention;

/// <summary>One sequence's share of a packed step: which query rows it owns and how long its context is.</summary>
/// <param name="QueryStart">First row of this sequence in the packed tokens.</param>
/// <param name="QueryLength">Rows this sequence contributes this step (a prefill chunk, or 1 for decode).</param>
/// <param name="ContextLength">Tokens the sequence attends to after this step's tokens are written (cached + new).</param>
/// <param name="ContextStart">First row of this sequence's context in <see cref="AttentionMetadata.ContextSlots"/>.</param>
public readonly record struct SequenceSpan(int QueryStart, int QueryLength, int ContextLength, int ContextStart);

/// <summary>
/// What attention needs to know about a packed step: where each new token's K/V goes (slot mapping) and where each
/// sequence's context lives in the paged cache (its block table expanded to slots).
/// </summary>
public sealed class AttentionMetadata
{
    /// <summary>Creates metadata; the tensors are owned by the caller's dispose scope.</summary>
    public AttentionMetadata(Tensor slotMapping, Tensor contextSlots, IReadOnlyList<SequenceSpan> sequences,
        int[][] blockTables, int blockSize)
    {
        SlotMapping = slotMapping;
        ContextSlots = contextSlots;
        Sequences = sequences;
        BlockTables = blockTables;
        BlockSize = blockSize;
    }

    /// <summary>[tokens] int64: cache slot (<c>block * blockSize + offset</c>) of every packed token.</summary>
    public Tensor SlotMapping { get; }
    /// <summary>[sum of context lengths] int64: the slots of each sequence's whole context, sequence after sequence.</summary>
    public Tensor ContextSlots { get; }
    /// <summary>Per-sequence spans, in packed order.</summary>
    public IReadOnlyList<SequenceSpan> Sequences { get; }
    /// <summary>Per-sequence block tables (host copy).</summary>
    public int[][] BlockTables { get; }
    /// <summary>Tokens per block.</summary>
    public int BlockSize { get; }
}
