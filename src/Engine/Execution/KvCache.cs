using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Execution;

/// <summary>
/// The paged KV cache: per layer one K and one V tensor shaped [numBlocks, blockSize, numKvHeads, headDim], allocated
/// once at start-up and addressed by slot (<c>block * blockSize + offset</c>).
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly Tensor[] _k;
    private readonly Tensor[] _v;

    /// <summary>Allocates the cache (zero-filled).</summary>
    public KvCache(int numLayers, int numBlocks, int blockSize, int numKvHeads, int headDim, ScalarType dtype, Device device)
    {
        NumBlocks = numBlocks;
        BlockSize = blockSize;
        _k = new Tensor[numLayers];
        _v = new Tensor[numLayers];
        for (int l = 0; l < numLayers; l++)
        {
            _k[l] = zeros([numBlocks, blockSize, numKvHeads, headDim], dtype, device);
            _v[l] = zeros([numBlocks, blockSize, numKvHeads, headDim], dtype, device);
            HugePages.Advise(_k[l]);
            HugePages.Advise(_v[l]);
        }
    }

    /// <summary>Blocks per layer.</summary>
    public int NumBlocks { get; }
    /// <summary>Tokens per block.</summary>
    public int BlockSize { get; }

    /// <summary>Layer <paramref name="layer"/>'s key cache.</summary>
    public Tensor Keys(int layer) => _k[layer];
    /// <summary>Layer <paramref name="layer"/>'s value cache.</summary>
    public Tensor Values(int layer) => _v[layer];

    /// <summary>Bytes one block takes across all layers, K and V.</summary>
    public static long BytesPerBlock(int numLayers, int blockSize, int numKvHeads, int headDim, ScalarType dtype) =>
        2L * numLayers * blockSize * numKvHeads * headDim * ElementSize(dtype);

    internal static int ElementSize(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 4,
        ScalarType.BFloat16 or ScalarType.Float16 => 2,
        ScalarType.Float64 => 8,
        _ => throw new NotSupportedException($"KV cache dtype {dtype} is not supported."),
    };

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var t in _k) t.Dispose();
        foreach (var t in _v) t.Dispose();
    }
}
