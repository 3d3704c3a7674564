using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// bfloat16 checkpoints kept in bfloat16 (<see cref="EngineOptions.WeightDType"/> "auto"): the model computes the
/// same logits and greedy tokens as with the matrices expanded to float32, in half the memory.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class Bf16WeightsTests
{
    /// <summary>The fixtures whose checkpoints store bfloat16 (shared/fixtures/README.md).</summary>
    public static TheoryData<string> Bf16Models => new("tiny-qwen2", "tiny-qwen3-chat");

    [Theory]
    [MemberData(nameof(Bf16Models))]
    public void A_bf16_checkpoint_stays_bf16_and_equals_its_float32_expansion(string model)
    {
        using var kept = new Llm(EngineHarness.Options(model));
        using var expanded = new Llm(EngineHarness.Options(model, o => o.WeightDType = "float32"));
        Assert.Equal(ScalarType.BFloat16, kept.Engine.Model.MatrixDType);
        Assert.Equal(ScalarType.Float32, expanded.Engine.Model.MatrixDType);
        Assert.Equal(ScalarType.Float32, kept.Engine.Model.DType);
        // Where the CPU runs the panel kernel every matrix of these models is in panels (all shapes are multiples of 32).
        int matrices = 4 * kept.Engine.Model.Config.NumHiddenLayers + 2;
        Assert.Equal(Kernels.Cpu.Bf16Panels.Supported ? matrices : 0, kept.Engine.Model.MatricesInPanels);
        // The matrices are nearly all of the parameters: half the bytes, give or take the float32 norms.
        double ratio = (double)kept.Engine.Model.WeightBytes / expanded.Engine.Model.WeightBytes;
        Assert.InRange(ratio, 0.5, 0.52);

        foreach (var c in Fixtures.Reference(model)["cases"]!.AsArray())
        {
            var ids = Fixtures.Ints(c!["prompt_ids"]);
            var a = EngineHarness.AllPositionLogits(kept.Engine, ids);
            var b = EngineHarness.AllPositionLogits(expanded.Engine, ids);
            for (int r = 0; r < a.Length; r++)
                Assert.True(EngineHarness.MaxAbsDiff(a[r], b[r]) <= 1e-4f, $"{model}/{c["name"]} row {r}: {EngineHarness.MaxAbsDiff(a[r], b[r])}");
            var greedy = Fixtures.Ints(c["greedy_ids"]);
            Assert.Equal(greedy, kept.Generate([ids], EngineHarness.Greedy(greedy.Length))[0].Outputs[0].TokenIds);
        }

        // A batch of every case's prompt together (rows through the batched kernels) gives each one's plain greedy run.
        var prompts = Fixtures.Reference(model)["cases"]!.AsArray().Select(c => Fixtures.Ints(c!["prompt_ids"])).ToArray();
        var batched = kept.Generate(prompts.Select(p => (IReadOnlyList<int>)p).ToList(), EngineHarness.Greedy(24));
        for (int i = 0; i < prompts.Length; i++)
            Assert.Equal(expanded.Generate([prompts[i]], EngineHarness.Greedy(24))[0].Outputs[0].TokenIds, batched[i].Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(kept.Engine);
    }

    /// <summary>Asked for, a float32 checkpoint is rounded to bfloat16: within the fixtures' bf16 bound of the reference.</summary>
    [Fact]
    public void A_float32_checkpoint_rounds_to_bf16_on_request()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => o.WeightDType = "bfloat16"));
        using var auto = new Llm(EngineHarness.Options("tiny-llama"));
        Assert.Equal(ScalarType.BFloat16, llm.Engine.Model.MatrixDType);
        Assert.Equal(ScalarType.Float32, auto.Engine.Model.MatrixDType); // "auto" keeps a float32 checkpoint as it is
        foreach (var c in Fixtures.Reference("tiny-llama")["cases"]!.AsArray())
        {
            var rows = EngineHarness.AllPositionLogits(llm.Engine, Fixtures.Ints(c!["prompt_ids"]));
            var reference = c["logits"]!.AsArray();
            float diff = EngineHarness.MaxAbsDiff(rows[^1], Fixtures.Floats(reference[reference.Count - 1]));
            Assert.True(diff <= 0.1f, $"{c["name"]}: {diff}");
        }
    }

    /// <summary>Without the CPU kernels (the libtorch path other devices take), the option does not apply: float32 throughout.</summary>
    [Fact]
    public void The_libtorch_path_keeps_the_compute_dtype()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen2", o => { o.CpuKernels = false; o.WeightDType = "bfloat16"; }));
        Assert.Equal(ScalarType.Float32, llm.Engine.Model.MatrixDType);
    }

    [Fact]
    public void An_unknown_weight_dtype_is_refused_naming_it()
    {
        var e = Assert.Throws<ArgumentException>(() => new Llm(EngineHarness.Options("tiny-qwen2", o => o.WeightDType = "fp8")));
        Assert.Contains("'fp8'", e.Message);
        Assert.Equal("WeightDType", e.ParamName);
    }
}
