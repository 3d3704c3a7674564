using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Models;

/// <summary>
/// <c>y = x W^T + b</c> for a handful of rows on the CPU in float32 (single-stream and small-batch decode), written as
/// a weight-streaming loop: each weight row is read once and dotted with every input row while it is in cache, in
/// parallel over output rows. With one to four input rows this is a matrix-vector product bound by memory bandwidth,
/// where libtorch's GEMV path reached 15-30 GB/s here; larger batches go to libtorch's GEMM.
/// </summary>
internal static unsafe class SmallBatchLinear
{
    /// <summary>Rows up to which the streaming loop is used.</summary>
    public const int MaxRows = 4;

    public static Tensor Apply(Tensor x, Tensor weight, Tensor? bias)
    {
        if (x.shape[0] > MaxRows || x.dtype != ScalarType.Float32 || weight.dtype != ScalarType.Float32
            || x.device_type != TorchSharp.DeviceType.CPU || !weight.is_contiguous())
            return F.linear(x, weight, bias);
        int m = (int)x.shape[0], k = (int)x.shape[1], n = (int)weight.shape[0];
        using var xc = x.contiguous();
        var y = empty([m, n], ScalarType.Float32);
        var job = new Job(Pointer(xc), Pointer(weight), Pointer(y), m, k, n);
        int chunks = Math.Min(n, Environment.ProcessorCount * 8);
        Parallel.For(0, chunks, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, c =>
            job.Run((int)((long)n * c / chunks), (int)((long)n * (c + 1) / chunks)));
        if (bias is not null) y.add_(bias);
        return y;
    }

    private sealed class Job(float* x, float* w, float* y, int m, int k, int n)
    {
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Run(int from, int to)
        {
            for (int row = from; row < to; row++)
            {
                float* wr = w + (long)row * k;
                for (int r = 0; r < m; r++) y[(long)r * n + row] = Dot(wr, x + (long)r * k, k);
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Dot(float* a, float* b, int n)
    {
        int i = 0;
        var s0 = Vector256<float>.Zero;
        var s1 = Vector256<float>.Zero;
        var s2 = Vector256<float>.Zero;
        var s3 = Vector256<float>.Zero;
        for (; i + 32 <= n; i += 32)
        {
            s0 = Fma(Vector256.Load(a + i), Vector256.Load(b + i), s0);
            s1 = Fma(Vector256.Load(a + i + 8), Vector256.Load(b + i + 8), s1);
            s2 = Fma(Vector256.Load(a + i + 16), Vector256.Load(b + i + 16), s2);
            s3 = Fma(Vector256.Load(a + i + 24), Vector256.Load(b + i + 24), s3);
        }
        for (; i + 8 <= n; i += 8) s0 = Fma(Vector256.Load(a + i), Vector256.Load(b + i), s0);
        float sum = Vector256.Sum((s0 + s1) + (s2 + s3));
        for (; i < n; i++) sum += a[i] * b[i];
        return sum;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) =>
        System.Runtime.Intrinsics.X86.Fma.IsSupported ? System.Runtime.Intrinsics.X86.Fma.MultiplyAdd(a, b, c) : a * b + c;

    private static float* Pointer(Tensor t) => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(t.bytes));
}
