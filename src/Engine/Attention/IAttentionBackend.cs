using static TorchSharp.torch;

namespace LocalVllm.Engine.Attention;

/// <summary>
/// Paged attention: writes the step's keys and values into the cache through the slot mapping, then attends each
/// sequence's queries to its cached context plus the new tokens, causally.
/// </summary>
public interface IAttentionBackend
{
    /// <summary>
    /// Computes attention for one layer. <paramref name="q"/> is [tokens, numHeads, headDim], <paramref name="k"/> and
    /// <paramref name="v"/> are [tokens, numKvHeads, headDim]; the caches are [numBlocks, blockSize, numKvHeads, headDim].
    /// Returns [tokens, numHeads * headDim].
    /// </summary>
    Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor kCache, Tensor vCache, AttentionMetadata metadata);

    /// <summary>
    /// Whether <see cref="Forward"/> reads <see cref="AttentionMetadata.ContextSlots"/> for a sequence with
    /// <paramref name="queryLength"/> rows this step over <paramref name="contextLength"/> positions: the model runner
    /// expands block tables into context slots (O(context) per sequence and step) only where this says so.
    /// </summary>
    bool ReadsContextSlots(int queryLength, int contextLength) => true;
}
