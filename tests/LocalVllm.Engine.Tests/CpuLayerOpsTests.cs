using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Models;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Tests;

/// <summary>The fused float32 layer ops equal the libtorch expressions they replace.</summary>
[Trait("Category", "Kernels")]
public sealed class CpuLayerOpsTests
{
    private static void AssertClose(Tensor expected, Tensor actual, float tolerance = 1e-5f)
    {
        Assert.Equal(expected.shape, actual.shape);
        float diff = (expected - actual).abs().max().item<float>();
        Assert.True(diff < tolerance, $"max abs difference {diff}");
    }

    [Theory]
    [InlineData(1, 64)]
    [InlineData(3, 37)] // a width that is not a multiple of 8
    [InlineData(300, 1024)] // enough elements to run in parallel
    public void RmsNorm_and_AddRmsNorm_equal_the_torch_expressions(int rows, int dim)
    {
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(3);
        var x = randn([rows, dim], generator: g) * 3;
        var delta = randn([rows, dim], generator: g);
        var w = rand([dim], generator: g) + 0.5;
        AssertClose(CausalLm.RmsNorm(x, w, 1e-6), CpuLayerOps.RmsNorm(x, w, 1e-6));
        var (hidden, normed) = CpuLayerOps.AddRmsNorm(x, delta, w, 1e-5);
        AssertClose(x + delta, hidden);
        AssertClose(CausalLm.RmsNorm(x + delta, w, 1e-5), normed);
    }

    [Theory]
    [InlineData(1, 4, 2, 64, true)]
    [InlineData(5, 16, 8, 128, true)] // Qwen3's shape: per-head norms
    [InlineData(300, 4, 4, 8, false)] // Llama without q/k norms; many tokens (parallel)
    [InlineData(2, 3, 1, 20, true)] // half a head that is not a multiple of 8
    public void SplitNormRope_equals_narrow_norm_and_RotaryEmbedding_Apply(int tokens, int heads, int kvHeads, int headDim, bool qkNorm)
    {
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(5);
        var qkv = randn([tokens, (heads + 2 * kvHeads) * headDim], generator: g);
        var qNorm = qkNorm ? rand([headDim], generator: g) + 0.5 : null;
        var kNorm = qkNorm ? rand([headDim], generator: g) + 0.5 : null;
        var angles = randn([tokens, headDim / 2], generator: g) * 10;
        var emb = cat([angles, angles], 1);
        var (cos, sin) = (emb.cos(), emb.sin());

        long qSize = (long)heads * headDim, kvSize = (long)kvHeads * headDim;
        var q = qkv.narrow(1, 0, qSize).reshape(tokens, heads, headDim);
        var k = qkv.narrow(1, qSize, kvSize).reshape(tokens, kvHeads, headDim);
        var v = qkv.narrow(1, qSize + kvSize, kvSize).reshape(tokens, kvHeads, headDim);
        if (qNorm is not null) q = CausalLm.RmsNorm(q, qNorm, 1e-6);
        if (kNorm is not null) k = CausalLm.RmsNorm(k, kNorm, 1e-6);
        var (c3, s3) = RotaryEmbedding.ForHeads(cos, sin, ScalarType.Float32);
        var expectedQ = RotaryEmbedding.Apply(q, c3, s3);
        var expectedK = RotaryEmbedding.Apply(k, c3, s3);

        var (aq, ak, av) = CpuLayerOps.SplitNormRope(qkv, heads, kvHeads, headDim, qNorm, kNorm, 1e-6, cos, sin);
        AssertClose(expectedQ, aq);
        AssertClose(expectedK, ak);
        AssertClose(v, av, 0f + float.Epsilon);
    }

    [Theory]
    [InlineData(1, 3072)]
    [InlineData(7, 45)]
    [InlineData(64, 3072)]
    public void SiluMul_equals_silu_of_gate_times_up(int rows, int intermediate)
    {
        using var scope = NewDisposeScope();
        var gateUp = randn([rows, 2 * intermediate], generator: new TorchSharp.torch.Generator(9)) * 4;
        var expected = F.silu(gateUp.narrow(1, 0, intermediate)) * gateUp.narrow(1, intermediate, intermediate);
        AssertClose(expected, CpuLayerOps.SiluMul(gateUp, intermediate));
    }
}
