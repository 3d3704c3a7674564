using System.Runtime.Intrinsics;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>Greedy token choice over float32 CPU logits in C#, parallel over rows.</summary>
internal static class CpuArgMax
{
    /// <summary>
    /// The index of each row's largest value (the first one on ties; a NaN wins, as in torch.argmax). float32 CPU rows
    /// are scanned in C# in parallel (libtorch's argmax over [64, 151936] took 8 ms per step); others go to libtorch.
    /// </summary>
    public static unsafe long[] ArgMax(Tensor logits)
    {
        if (logits.dtype != ScalarType.Float32 || logits.device_type != DeviceType.CPU || !logits.is_contiguous() || logits.dim() != 2)
            return logits.argmax(-1).data<long>().ToArray();
        int rows = (int)logits.shape[0], n = (int)logits.shape[1];
        var result = new long[rows];
        float* data = Simd.Pointer(logits);
        CpuWorkers.Shared.For(rows, r =>
        {
            float* x = data + (long)r * n;
            var maxV = Vector256.Create(float.NegativeInfinity);
            var nanV = Vector256<float>.Zero;
            int i = 0;
            for (; i + 8 <= n; i += 8)
            {
                var v = Vector256.Load(x + i);
                maxV = Vector256.Max(maxV, v);
                nanV |= ~Vector256.Equals(v, v);
            }
            float max = float.NegativeInfinity;
            for (int l = 0; l < 8; l++) max = MathF.Max(max, maxV[l]);
            bool nan = nanV != Vector256<float>.Zero;
            for (; i < n; i++)
            {
                nan |= float.IsNaN(x[i]);
                if (x[i] > max) max = x[i];
            }
            result[r] = nan ? FirstNaN(x, n) : FirstEqual(x, n, max);
        });
        return result;
    }

    private static unsafe int FirstEqual(float* x, int n, float value)
    {
        var target = Vector256.Create(value);
        int i = 0;
        for (; i + 8 <= n; i += 8)
        {
            uint mask = Vector256.Equals(Vector256.Load(x + i), target).ExtractMostSignificantBits();
            if (mask != 0) return i + System.Numerics.BitOperations.TrailingZeroCount(mask);
        }
        for (; i < n; i++) if (x[i] == value) return i;
        return 0;
    }

    private static unsafe int FirstNaN(float* x, int n)
    {
        for (int i = 0; i < n; i++) if (float.IsNaN(x[i])) return i;
        return 0;
    }
}
