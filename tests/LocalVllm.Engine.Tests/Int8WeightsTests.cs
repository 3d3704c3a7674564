using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Tests;

/// <summary>The int8 quantizer against Q8_0's definition, and the int8 kernels against dequantize-then-matmul.</summary>
[Trait("Category", "Kernels")]
public sealed class Int8KernelTests
{
    /// <summary>
    /// Known blocks encoded as ggml's reference quantizer (quantize_row_q8_0_ref) does: d = max|x| / 127 stored as
    /// float16, q = round(x / d) with halves away from zero by the float32 d. The second block's figures were computed
    /// by a separate Python transcription of that function (float32 steps emulated with struct).
    /// </summary>
    [Fact]
    public unsafe void The_quantizer_encodes_known_blocks_as_Q8_0_defines_them()
    {
        // max |x| = 127: d = 1, so q is x rounded, halves away from zero.
        float[] exact = [127, -127, 0.5f, -0.5f, 1.5f, -2.5f, 3.49f, 0, 126.5f, -126.5f, 64, -1.5f, .. new float[20]];
        sbyte[] exactQ = [127, -127, 1, -1, 2, -3, 3, 0, 127, -127, 64, -2, .. new sbyte[20]];
        AssertBlock(exact, exactQ, 1f);

        float[] scaled = [100, -100, 50, -50, 0.4f, -0.4f, 39.37f, -39.37f, 25, 12.5f, -7.25f, 3, .. new float[20]];
        sbyte[] scaledQ = [127, -127, 64, -64, 1, -1, 50, -50, 32, 16, -9, 4, .. new sbyte[20]];
        AssertBlock(scaled, scaledQ, 0.78759765625f); // float16(100 / 127)

        AssertBlock(new float[32], new sbyte[32], 0f); // an all-zero block: scale 0, no division by zero
    }

    private static unsafe void AssertBlock(float[] x, sbyte[] expectedQ, float expectedScale)
    {
        var q = new sbyte[32];
        float scale;
        fixed (float* xp = x)
        fixed (sbyte* qp = q)
            Q8.QuantizeGroup(xp, qp, &scale);
        Assert.Equal(expectedScale, scale);
        Assert.Equal(expectedQ, q);

        // The tensor quantizer gives the same, and dequantizes to exactly scale * q.
        using var scope = NewDisposeScope();
        var (values, scales) = Q8.Quantize(tensor(x).reshape(1, 32));
        Assert.Equal(expectedQ, values.data<sbyte>().ToArray());
        Assert.Equal(expectedScale, scales.item<float>());
        var back = new float[32];
        fixed (float* b = back)
            Q8.Dequantize((sbyte*)Simd.Pointer(values), Simd.Pointer(scales), b, 32);
        Assert.Equal(expectedQ.Select(v => v * expectedScale).ToArray(), back);
    }

    /// <summary>
    /// Quantizing reads float32, bfloat16 and float16 checkpoints alike: a 16-bit matrix quantizes exactly as its
    /// float32 widening does (the conversion inside the quantizer is exact).
    /// </summary>
    [Theory]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    public void Sixteen_bit_sources_quantize_as_their_float32_values(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var w = (randn([96, 128], generator: new TorchSharp.torch.Generator(23)) * 3).to(dtype);
        var (q16, s16) = Q8.Quantize(w);
        var (q32, s32) = Q8.Quantize(w.to(ScalarType.Float32));
        Assert.True(q16.equal(q32).all().item<bool>());
        Assert.True(s16.equal(s32).all().item<bool>());
    }

    /// <summary>The dequantized matrix as libtorch computes it from the stored parts (independent of Q8.Dequantize).</summary>
    private static Tensor Dequantized(Tensor values, Tensor scales) =>
        values.to(ScalarType.Float32) * scales.repeat_interleave(Q8.Group, dim: 1);

    /// <summary>Whether the automatic kernel choice quantizes the inputs of int8 weights on this CPU (AVX-VNNI).</summary>
    private static bool InputsQuantized => SmallBatchLinear.IntegerActivations && Q8Gemm.Supported;

    /// <summary>
    /// The inputs as the integer kernels see them, computed here with libtorch: per row and group of 32, d = max|x| / 127,
    /// q = round-half-even(x * (1 / d)), and back to d * q (all in float32, as the kernels quantize).
    /// </summary>
    private static Tensor QuantizedInputs(Tensor x)
    {
        long rows = x.shape[0], k = x.shape[1];
        var g = x.reshape(rows, k / Q8.Group, Q8.Group);
        var d = g.abs().amax([2], keepdim: true) / 127f;
        var inverse = where(d.ne(0), ones_like(d) / d, zeros_like(d));
        return ((g * inverse).round() * d).reshape(rows, k);
    }

    /// <summary>
    /// The integer kernels (int8 inputs, AVX-VNNI): the tiles and the dot kernel against libtorch's float32 linear of
    /// the quantized inputs (<see cref="QuantizedInputs"/>) and the dequantized weights. The kernels' group sums are
    /// exact integers, so the bound is float32 rounding only. Shapes cover one, two and partial 8-row blocks, weight
    /// rows beyond a multiple of 4, and 3, 9 and 32 groups (the dot kernel's eight groups at a time and the rest).
    /// </summary>
    [SkippableTheory]
    [InlineData(1, 96, 37)]
    [InlineData(3, 288, 40)]
    [InlineData(8, 1024, 64)]
    [InlineData(13, 96, 38)]
    [InlineData(16, 288, 24)]
    [InlineData(21, 1024, 45)]
    [InlineData(300, 64, 20)] // two panels of rows
    public void Integer_kernels_equal_the_float_product_of_the_quantized_inputs(int rows, int inFeatures, int outFeatures)
    {
        Skip.IfNot(Q8Gemm.Supported, "the integer kernels need AVX-VNNI");
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(29);
        var x = randn([rows, inFeatures], generator: g) * 2;
        var (values, scales) = Q8.Quantize(randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures));
        var expected = F.linear(QuantizedInputs(x), Dequantized(values, scales));
        foreach (var kernel in new[] { SmallBatchLinear.Kernel.Integer, SmallBatchLinear.Kernel.IntegerDot })
        {
            var actual = SmallBatchLinear.Apply(x, values, null, kernel, scales);
            float err = (expected - actual).abs().max().item<float>();
            Assert.True(err < 1e-4f, $"{kernel}, {rows} rows: max error {err}");
        }
    }

    /// <summary>
    /// The switch the LM head uses: with <c>quantizeInputs: false</c> int8 weights meet the float32 inputs themselves
    /// (dequantize-then-matmul over the unquantized x), even where the CPU would quantize them.
    /// </summary>
    [Theory]
    [InlineData(1, 96, 37)]
    [InlineData(16, 288, 40)]
    public void Int8_weights_with_float_inputs_equal_the_dequantized_matmul_of_the_inputs_themselves(int rows, int inFeatures, int outFeatures)
    {
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(37);
        var x = randn([rows, inFeatures], generator: g);
        var (values, scales) = Q8.Quantize(randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures));
        var expected = F.linear(x, Dequantized(values, scales));
        var actual = SmallBatchLinear.Apply(x, values, null, scales: scales, quantizeInputs: false);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f);
    }

    /// <summary>
    /// A row's outputs are the same bits whether it is computed alone (the dot kernel, as in single-stream decode) or
    /// in a batch (the tiles, as in prefill and batched decode): batching must not change greedy tokens.
    /// </summary>
    [SkippableTheory]
    [InlineData(21, 288, 38)]
    [InlineData(16, 1024, 64)]
    public void Integer_kernels_give_a_row_the_same_bits_alone_and_in_a_batch(int rows, int inFeatures, int outFeatures)
    {
        Skip.IfNot(Q8Gemm.Supported, "the integer kernels need AVX-VNNI");
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(31);
        var x = randn([rows, inFeatures], generator: g);
        var (values, scales) = Q8.Quantize(randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures));
        var batched = SmallBatchLinear.Apply(x, values, null, SmallBatchLinear.Kernel.Integer, scales);
        for (int r = 0; r < rows; r++)
        {
            var alone = SmallBatchLinear.Apply(x.narrow(0, r, 1), values, null, SmallBatchLinear.Kernel.IntegerDot, scales);
            Assert.True(alone.equal(batched.narrow(0, r, 1)).all().item<bool>(), $"row {r}");
        }
    }

    /// <summary>
    /// Every row count (the dot kernel for one and two rows, the broadcast layouts, the libtorch path above the
    /// kernels' rows) against libtorch's float32 linear over the dequantized matrix. The bound is float32 rounding of
    /// the sums only (the weights are the same values): 1e-4 on outputs of order 1.
    /// </summary>
    [Theory]
    [InlineData(1, 64, 160, false)]
    [InlineData(1, 1024, 37, true)]
    [InlineData(2, 1024, 96, false)]
    [InlineData(3, 96, 33, true)]
    [InlineData(5, 256, 64, false)]
    [InlineData(10, 32, 17, true)]
    [InlineData(17, 128, 19, false)]
    [InlineData(64, 1024, 97, true)]
    [InlineData(600, 64, 24, true)]
    [InlineData(520, 64, 600, false)]
    public void Int8_linear_equals_the_dequantized_matmul(int rows, int inFeatures, int outFeatures, bool withBias)
    {
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(3);
        var x = randn([rows, inFeatures], generator: g);
        var w = randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures);
        var b = withBias ? randn([outFeatures], generator: g) : null;
        var (values, scales) = Q8.Quantize(w);
        Assert.Equal(ScalarType.Int8, values.dtype);
        var expected = F.linear(InputsQuantized ? QuantizedInputs(x) : x, Dequantized(values, scales), b);
        var actual = SmallBatchLinear.Apply(x, values, b, scales: scales);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f);
        // And each weight is within half a step of its dequantized value, plus what rounding the scale to float16
        // moves the largest (|q| = 127) by: 127 * d * 2^-11.
        var step = scales.repeat_interleave(Q8.Group, dim: 1);
        Assert.True(((Dequantized(values, scales) - w).abs() - step * (0.5f + 127f / 2048)).max().item<float>() <= 1e-6f);
    }

    /// <summary>
    /// No rows (a step whose prefill chunk needs no logits reaches the LM head with none): an empty result in every
    /// storage format, and nothing written anywhere (this once wrote past an empty output).
    /// </summary>
    [Theory]
    [InlineData("float32")]
    [InlineData("bfloat16")]
    [InlineData("int8")]
    public void Zero_rows_give_an_empty_result_in_every_format(string format)
    {
        using var scope = NewDisposeScope();
        var x = zeros([0, 64]);
        var w = randn([40000, 64]);
        var y = format switch
        {
            "int8" => Q8.Quantize(w) is var (q, s) ? SmallBatchLinear.Apply(x, q, null, scales: s) : null!,
            "bfloat16" => SmallBatchLinear.Apply(x, w.to(ScalarType.BFloat16), null),
            _ => SmallBatchLinear.Apply(x, w, null),
        };
        Assert.Equal([0L, 40000L], y.shape);
    }

    [SkippableTheory]
    [InlineData("Dot", 1, 64, 24)]
    [InlineData("Dot", 7, 96, 100)]
    [InlineData("Broadcast", 1, 64, 24)]
    [InlineData("Broadcast", 6, 1024, 100)]
    [InlineData("Broadcast", 29, 256, 64)]
    [InlineData("Broadcast", 64, 128, 13)]
    public void Each_kernel_with_int8_weights_equals_the_dequantized_matmul(string kernelName, int rows, int inFeatures, int outFeatures)
    {
        var kernel = Enum.Parse<SmallBatchLinear.Kernel>(kernelName);
        Skip.If(kernel == SmallBatchLinear.Kernel.Broadcast && !SmallBatchLinear.BroadcastSupported, "the broadcast kernel needs AVX-512");
        using var scope = NewDisposeScope();
        var g = new TorchSharp.torch.Generator(17);
        var x = randn([rows, inFeatures], generator: g);
        var (values, scales) = Q8.Quantize((randn([outFeatures, inFeatures], generator: g) / MathF.Sqrt(inFeatures)).to(ScalarType.BFloat16));
        var expected = F.linear(x, Dequantized(values, scales));
        var actual = SmallBatchLinear.Apply(x, values, null, kernel, scales);
        Assert.True((expected - actual).abs().max().item<float>() < 1e-4f, $"{kernel} kernel, {rows} rows");
    }
}

/// <summary>The engine with int8 weights on the fixtures: close to float32, and everything else keeps working.</summary>
[Trait("Category", "Fixtures")]
public sealed class Int8EngineTests
{
    /// <summary>
    /// stories260K (a real trained model) quantized at load: over every position of its reference prompts, the mean
    /// KL divergence of the next-token distribution from float32's stays small and the top-1 token mostly agrees.
    /// Its 172-wide MLP rows are not whole groups of 32, so those matrices stay float32 (as llama.cpp leaves them).
    /// </summary>
    [Fact]
    public void Stories260K_in_int8_stays_close_to_float32()
    {
        using var f32 = new Llm(EngineHarness.Options("stories260K"));
        using var q8 = new Llm(EngineHarness.Options("stories260K", o => o.Quantization = "int8"));
        Assert.Equal(ScalarType.Int8, q8.Engine.Model.MatrixDType);
        Assert.True(q8.Engine.Model.WeightBytes < 0.6 * f32.Engine.Model.WeightBytes, $"{q8.Engine.Model.WeightBytes} vs {f32.Engine.Model.WeightBytes}");
        double kl = 0;
        int positions = 0, agree = 0;
        foreach (var c in Fixtures.Reference("stories260K")["cases"]!.AsArray())
        {
            var ids = Fixtures.Ints(c!["prompt_ids"]);
            var a = EngineHarness.AllPositionLogits(f32.Engine, ids);
            var b = EngineHarness.AllPositionLogits(q8.Engine, ids);
            for (int r = 0; r < a.Length; r++)
            {
                kl += KlDivergence(a[r], b[r]);
                positions++;
                if (Array.IndexOf(a[r], a[r].Max()) == Array.IndexOf(b[r], b[r].Max())) agree++;
            }
        }
        Assert.True(positions > 0);
        Assert.True(kl / positions < 0.01, $"mean KL {kl / positions} over {positions} positions");
        Assert.True(agree >= 0.9 * positions, $"top-1 agreement {agree}/{positions}");
        EngineHarness.AssertNoLeaks(q8.Engine);
    }

    /// <summary>KL(p || q) of the softmaxes of two logit rows, in nats.</summary>
    internal static double KlDivergence(float[] p, float[] q)
    {
        double mp = p.Max(), mq = q.Max();
        double zp = p.Sum(v => Math.Exp(v - mp)), zq = q.Sum(v => Math.Exp(v - mq));
        double kl = 0;
        for (int i = 0; i < p.Length; i++)
        {
            double lp = p[i] - mp - Math.Log(zp), lq = q[i] - mq - Math.Log(zq);
            kl += Math.Exp(lp) * (lp - lq);
        }
        return kl;
    }

    /// <summary>Batched, paged and prefix-cached runs of the int8 model give its own unbatched greedy tokens.</summary>
    [Fact]
    public void Int8_batched_greedy_equals_int8_unbatched()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen2", o => o.Quantization = "int8"));
        Assert.Equal(ScalarType.Int8, llm.Engine.Model.MatrixDType);
        var prompts = Fixtures.Reference("tiny-qwen2")["cases"]!.AsArray().Select(c => (IReadOnlyList<int>)Fixtures.Ints(c!["prompt_ids"])).ToList();
        var alone = prompts.Select(p => llm.Generate([p], EngineHarness.Greedy(20))[0].Outputs[0].TokenIds.ToArray()).ToList();
        var together = llm.Generate(prompts, EngineHarness.Greedy(20));
        for (int i = 0; i < prompts.Count; i++) Assert.Equal(alone[i], together[i].Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Theory]
    [InlineData("int4", "float32", "'int4'")]
    [InlineData("int8", "bfloat16", "float32")]
    public void Bad_quantization_settings_are_refused_naming_the_problem(string quantization, string dtype, string named)
    {
        var e = Assert.Throws<ArgumentException>(() => new Llm(EngineHarness.Options("tiny-qwen2", o => { o.Quantization = quantization; o.DType = dtype; })));
        Assert.Contains(named, e.Message);
        Assert.Equal("Quantization", e.ParamName);
    }
}
