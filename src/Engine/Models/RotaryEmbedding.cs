using LocalVllm.Engine.Kernels;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Models;

/// <summary>
/// Rotary position embedding in Hugging Face's rotate-half layout, with <c>rope_scaling</c> of type llama3, linear or
/// dynamic (NTK). Frequencies are computed in float32 exactly as transformers does.
/// </summary>
public sealed class RotaryEmbedding : IDisposable
{
    private readonly ModelConfig _config;
    private readonly Tensor _invFreq; // [headDim / 2] float32

    /// <summary>Builds the inverse frequencies for <paramref name="config"/>.</summary>
    public RotaryEmbedding(ModelConfig config, Device device)
    {
        _config = config;
        _invFreq = InverseFrequencies(config, config.RopeTheta, device);
    }

    /// <summary>Returns (cos, sin), each [tokens, headDim] float32, for <paramref name="positions"/> (int64 [tokens]).</summary>
    public (Tensor Cos, Tensor Sin) CosSin(Tensor positions, int maxPosition)
    {
        using var scope = NewDisposeScope();
        var invFreq = _invFreq;
        var s = _config.RopeScaling;
        if (s.Type == "dynamic")
        {
            int original = s.OriginalMaxPositionEmbeddings > 0 ? s.OriginalMaxPositionEmbeddings : _config.MaxPositionEmbeddings;
            int seqLen = maxPosition + 1;
            if (seqLen > original)
            {
                int dim = _config.HeadDim;
                double b = _config.RopeTheta * Math.Pow(s.Factor * seqLen / original - (s.Factor - 1), dim / (dim - 2.0));
                invFreq = Plain(b, dim, positions.device);
            }
        }
        var freqs = positions.to(ScalarType.Float32).unsqueeze(1) * invFreq.unsqueeze(0); // [tokens, headDim / 2]
        var emb = cat([freqs, freqs], 1); // [tokens, headDim]
        return (emb.cos().MoveToOuterDisposeScope(), emb.sin().MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Applies the rotation to <paramref name="x"/> ([tokens, heads, headDim]) given (cos, sin) shaped [tokens, 1, headDim]
    /// in x's dtype (see <see cref="ForHeads"/>; made once per step, used by every layer).
    /// </summary>
    public static Tensor Apply(Tensor x, Tensor c, Tensor s)
    {
        using var scope = NewDisposeScope();
        long half = x.shape[2] / 2;
        var x1 = x.narrow(2, 0, half);
        var x2 = x.narrow(2, half, half);
        var rotated = cat([x2.neg(), x1], 2);
        return HeldScalars.Add(x * c, rotated * s).MoveToOuterDisposeScope();
    }

    /// <summary>(cos, sin) from <see cref="CosSin"/> reshaped to [tokens, 1, headDim] in <paramref name="dtype"/>.</summary>
    public static (Tensor Cos, Tensor Sin) ForHeads(Tensor cos, Tensor sin, ScalarType dtype) =>
        (cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype));

    private static Tensor Plain(double theta, int dim, Device device)
    {
        using var exponents = arange(0, dim, 2, dtype: ScalarType.Int64, device: device).to(ScalarType.Float32) / dim;
        using var denom = pow(theta, exponents);
        return denom.reciprocal();
    }

    private static Tensor InverseFrequencies(ModelConfig config, double theta, Device device)
    {
        var inv = Plain(theta, config.HeadDim, device);
        var s = config.RopeScaling;
        switch (s.Type)
        {
            case "linear":
                using (inv) return inv / s.Factor;
            case "llama3":
            {
                using var scope = NewDisposeScope();
                double lowWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
                double highWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
                var wavelen = 2 * Math.PI / inv;
                var scaled = where(wavelen > lowWavelen, inv / s.Factor, inv);
                var smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                var smoothed = (1 - smooth) * scaled / s.Factor + smooth * scaled;
                var medium = (wavelen >= highWavelen).logical_and(wavelen <= lowWavelen);
                var result = where(medium, smoothed, scaled);
                inv.Dispose();
                return result.MoveToOuterDisposeScope();
            }
            default:
                return inv;
        }
    }

    /// <inheritdoc />
    public void Dispose() => _invFreq.Dispose();
}
