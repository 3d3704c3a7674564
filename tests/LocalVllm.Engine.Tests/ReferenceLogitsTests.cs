using LocalVllm.Engine.Attention;

namespace LocalVllm.Engine.Tests;

/// <summary>The forward pass against logits and greedy ids produced by transformers / llama.cpp (shared/fixtures).</summary>
[Trait("Category", "Fixtures")]
public sealed class ReferenceLogitsTests
{
    public static TheoryData<string> IdModels => new(Fixtures.IdModels);

    /// <summary>Each reference logits row of <paramref name="model"/>'s cases with the engine's row for the same position.</summary>
    private static IEnumerable<(string Where, float[] Mine, float[] Expected)> ReferenceRows(Llm llm, string model)
    {
        foreach (var c in Fixtures.Reference(model)["cases"]!.AsArray())
        {
            var rows = EngineHarness.AllPositionLogits(llm.Engine, Fixtures.Ints(c!["prompt_ids"]));
            var reference = c["logits"]!.AsArray();
            bool all = c["logits_positions"]!.GetValue<string>() == "all";
            for (int r = 0; r < reference.Count; r++)
                yield return ($"{model}/{c["name"]} row {r}", all ? rows[r] : rows[^1], Fixtures.Floats(reference[r]));
        }
    }

    [Theory]
    [MemberData(nameof(IdModels))]
    public void Logits_match_the_reference_within_1e4(string model)
    {
        using var llm = new Llm(EngineHarness.Options(model));
        foreach (var (where, mine, expected) in ReferenceRows(llm, model))
        {
            float diff = EngineHarness.MaxAbsDiff(mine, expected);
            Assert.True(diff <= 1e-4f, $"{where}: max abs diff {diff}");
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    /// <summary>The all-libtorch path (other dtypes and devices, e.g. CUDA) against the same references, in float32 on the CPU.</summary>
    [Theory]
    [MemberData(nameof(IdModels))]
    public void Without_the_CPU_kernels_logits_and_greedy_ids_match_the_reference(string model)
    {
        using var llm = new Llm(EngineHarness.Options(model, o => o.CpuKernels = false));
        Assert.IsType<TorchPagedAttention>(llm.Engine.Model.AttentionBackend);
        foreach (var c in Fixtures.Reference(model)["cases"]!.AsArray())
        {
            var ids = Fixtures.Ints(c!["prompt_ids"]);
            var rows = EngineHarness.AllPositionLogits(llm.Engine, ids);
            var reference = c["logits"]!.AsArray();
            var last = reference[reference.Count - 1]!;
            Assert.True(EngineHarness.MaxAbsDiff(rows[^1], Fixtures.Floats(last)) <= 1e-4f, $"{model}/{c["name"]}: last row");
            var greedy = Fixtures.Ints(c["greedy_ids"]);
            Assert.Equal(greedy, llm.Generate([ids], EngineHarness.Greedy(greedy.Length))[0].Outputs[0].TokenIds);
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    /// <summary>
    /// The engine computing in bfloat16 (weights and activations) against the float32 references, at the fixtures'
    /// bf16 tolerance: logits within 0.1 at every position, and the reference's argmax wherever its top-2 margin is
    /// wider than twice that bound (narrower margins may flip legitimately in bf16).
    /// </summary>
    [Theory]
    [MemberData(nameof(IdModels))]
    public void In_bfloat16_logits_stay_within_the_bf16_bound_and_clear_argmaxes_agree(string model)
    {
        const float bound = 0.1f;
        using var llm = new Llm(EngineHarness.Options(model, o => o.DType = "bfloat16"));
        Assert.Equal(TorchSharp.torch.ScalarType.BFloat16, llm.Engine.Model.DType);
        int clear = 0;
        foreach (var (where, mine, expected) in ReferenceRows(llm, model))
        {
            float diff = EngineHarness.MaxAbsDiff(mine, expected);
            Assert.True(diff <= bound, $"{where}: max abs diff {diff} in bfloat16");
            var sorted = expected.OrderDescending().ToArray();
            if (sorted[0] - sorted[1] > 2 * bound)
            {
                clear++;
                Assert.Equal(Array.IndexOf(expected, sorted[0]), Array.IndexOf(mine, mine.Max()));
            }
        }
        Assert.True(clear > 0, $"{model}: no position with a clear argmax; the argmax check compared nothing");
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Theory]
    [MemberData(nameof(IdModels))]
    public void Greedy_continuations_equal_the_reference(string model)
    {
        using var llm = new Llm(EngineHarness.Options(model));
        var cases = Fixtures.Reference(model)["cases"]!.AsArray();
        foreach (var c in cases)
        {
            var expected = Fixtures.Ints(c!["greedy_ids"]);
            var output = llm.Generate([Fixtures.Ints(c["prompt_ids"])], EngineHarness.Greedy(expected.Length))[0];
            Assert.Equal(expected, output.Outputs[0].TokenIds);
            Assert.Equal(FinishReasons.Length, output.Outputs[0].FinishReason);
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Prompt_logprobs_equal_the_reference_log_softmax()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var c = Fixtures.Reference("tiny-llama")["cases"]!.AsArray().First(x => x!["logits_positions"]!.GetValue<string>() == "all")!;
        var ids = Fixtures.Ints(c["prompt_ids"]);
        var output = llm.Generate([ids], EngineHarness.Greedy(1) with { PromptLogprobs = 3, Logprobs = 2 })[0];
        Assert.Null(output.PromptLogprobs![0]);
        var logits = c["logits"]!.AsArray();
        for (int pos = 1; pos < ids.Length; pos++)
        {
            var row = Fixtures.Floats(logits[pos - 1]).Select(x => (double)x).ToArray();
            double max = row.Max(), lse = max + Math.Log(row.Sum(x => Math.Exp(x - max)));
            var lp = output.PromptLogprobs[pos]!;
            Assert.Equal(ids[pos], lp.TokenId);
            Assert.True(Math.Abs(lp.Logprob - (row[ids[pos]] - lse)) <= 1e-4, $"position {pos}");
            Assert.Equal(3, lp.Top.Count);
            int best = Array.IndexOf(row, max);
            Assert.Equal(best, lp.Top[0].TokenId);
        }
        // The sampled token's logprob is the reference's last-row log-softmax at the greedy choice.
        var last = Fixtures.Floats(logits[ids.Length - 1]).Select(x => (double)x).ToArray();
        double m2 = last.Max(), lse2 = m2 + Math.Log(last.Sum(x => Math.Exp(x - m2)));
        var gen = output.Outputs[0].Logprobs![0];
        Assert.Equal(1, gen.Rank);
        Assert.True(Math.Abs(gen.Logprob - (m2 - lse2)) <= 1e-4);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Stories260K_matches_transformers_and_llama2c()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var reference = Fixtures.Reference("stories260K");
        foreach (var c in reference["cases"]!.AsArray())
        {
            var ids = Fixtures.Ints(c!["prompt_ids"]);
            var rows = EngineHarness.AllPositionLogits(llm.Engine, ids);
            var expected = Fixtures.Floats(c["last_logits"]);
            Assert.True(EngineHarness.MaxAbsDiff(rows[^1], expected) <= 1e-4f, $"{c["name"]}: {EngineHarness.MaxAbsDiff(rows[^1], expected)}");
        }
        var prompts = reference["cases"]!.AsArray().Select(c => (IReadOnlyList<int>)Fixtures.Ints(c!["prompt_ids"])).ToArray();
        var outputs = llm.Generate(prompts, EngineHarness.Greedy(64));
        for (int i = 0; i < prompts.Length; i++)
            Assert.Equal(Fixtures.Ints(reference["cases"]![i]!["greedy_ids"]), outputs[i].Outputs[0].TokenIds);

        var story = reference["unconditional_story"]!;
        var storyIds = Fixtures.Ints(story["greedy_ids"]);
        var storyOut = llm.Generate([Fixtures.Ints(story["prompt_ids"])], EngineHarness.Greedy(storyIds.Length))[0];
        Assert.Equal(storyIds, storyOut.Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Qwen3_with_the_real_vocabulary_matches_the_reference()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        foreach (var c in Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray())
        {
            var ids = Fixtures.Ints(c!["prompt_ids"]);
            var rows = EngineHarness.AllPositionLogits(llm.Engine, ids);
            var expected = Fixtures.Floats(c["last_logits"]);
            Assert.True(EngineHarness.MaxAbsDiff(rows[^1], expected) <= 1e-4f, $"{c["name"]}: {EngineHarness.MaxAbsDiff(rows[^1], expected)}");
            var greedy = Fixtures.Ints(c["greedy_ids"]);
            Assert.Equal(greedy, llm.Generate([ids], EngineHarness.Greedy(greedy.Length))[0].Outputs[0].TokenIds);
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Sharded_checkpoint_loads_to_the_same_logits_as_the_single_file()
    {
        using var single = new Llm(EngineHarness.Options("tiny-llama"));
        using var sharded = new Llm(EngineHarness.Options("tiny-llama-sharded"));
        Assert.Equal(2, sharded.Engine.Directory.WeightFiles.Count);
        var ids = Fixtures.Ints(Fixtures.Reference("tiny-llama")["cases"]![2]!["prompt_ids"]);
        var a = EngineHarness.AllPositionLogits(single.Engine, ids);
        var b = EngineHarness.AllPositionLogits(sharded.Engine, ids);
        for (int i = 0; i < a.Length; i++) Assert.Equal(a[i], b[i]);
    }
}
