using LocalVllm.Engine.Core;
using LocalVllm.Engine.Execution;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Speculative decoding by prompt lookup: the greedy output is llama2.c's and the plain engine's, token for token, while
/// steps carry accepted drafts; stops, token limits, preemption and the prefix cache behave as without it; requests
/// that cannot speculate share the batch unchanged.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class SpeculativeDecodingTests
{
    private static readonly SpeculativeConfig Ngram = new() { NumSpeculativeTokens = 4, PromptLookupMax = 4, PromptLookupMin = 2 };

    private static Llm Engine(bool speculate, Action<EngineOptions>? configure = null, string model = "stories260K") =>
        new(EngineHarness.Options(model, o =>
        {
            if (speculate) o.Speculative = Ngram;
            configure?.Invoke(o);
        }));

    /// <summary>llama2.c's 200-token greedy story from BOS (run.c, temperature 0), with drafts accepted along the way in fewer steps.</summary>
    [Fact]
    public void The_greedy_story_is_llama2cs_and_takes_fewer_steps()
    {
        var story = Fixtures.Reference("stories260K")["unconditional_story"]!;
        var expected = Fixtures.Ints(story["greedy_ids"]);
        long steps(Llm llm) => llm.Engine.GetStats().Steps;

        using var plain = Engine(speculate: false);
        var a = plain.Generate([(IReadOnlyList<int>)Fixtures.Ints(story["prompt_ids"])], EngineHarness.Greedy(expected.Length))[0];
        using var spec = Engine(speculate: true);
        var b = spec.Generate([(IReadOnlyList<int>)Fixtures.Ints(story["prompt_ids"])], EngineHarness.Greedy(expected.Length))[0];

        Assert.Equal(expected, a.Outputs[0].TokenIds);
        Assert.Equal(expected, b.Outputs[0].TokenIds);
        Assert.Equal(a.Outputs[0].Text, b.Outputs[0].Text);
        var stats = spec.Engine.GetStats();
        Assert.True(stats.SpecAcceptedTokens > 0, "no draft was ever accepted");
        Assert.True(stats.SpecDraftTokens >= stats.SpecAcceptedTokens);
        // Every accepted draft is a token that needed no step of its own (one prefill step each).
        Assert.Equal(steps(plain) - stats.SpecAcceptedTokens, steps(spec));
        // Generation tokens count what stands, not the rejected drafts: the same as the plain run's.
        Assert.Equal(plain.Engine.GetStats().DecodeTokens, stats.DecodeTokens);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// Each fixture prompt, batched, with and without EOS, at every token limit from 1 to 24 (a limit may fall inside
    /// a run of accepted drafts), and with a stop string taken from the plain output: the same tokens, text and finish.
    /// </summary>
    [Fact]
    public void Stops_limits_and_a_batch_give_the_plain_engines_outputs()
    {
        var prompts = Fixtures.Reference("stories260K")["cases"]!.AsArray().Select(c => c!["text"]!.GetValue<string>()).ToArray();
        using var plain = Engine(speculate: false);
        using var spec = Engine(speculate: true);
        void Same(IReadOnlyList<RequestOutput> x, IReadOnlyList<RequestOutput> y)
        {
            Assert.Equal(x.Count, y.Count);
            for (int i = 0; i < x.Count; i++)
            {
                Assert.Equal(x[i].Outputs[0].TokenIds, y[i].Outputs[0].TokenIds);
                Assert.Equal(x[i].Outputs[0].Text, y[i].Outputs[0].Text);
                Assert.Equal(x[i].Outputs[0].FinishReason, y[i].Outputs[0].FinishReason);
                Assert.Equal(x[i].Outputs[0].StopReason, y[i].Outputs[0].StopReason);
            }
        }
        var withEos = new SamplingParams { Temperature = 0, MaxTokens = 300 };
        var full = plain.Generate(prompts, withEos);
        Same(full, spec.Generate(prompts, withEos));
        Same(plain.Generate(prompts, EngineHarness.Greedy(150)), spec.Generate(prompts, EngineHarness.Greedy(150)));
        for (int limit = 1; limit <= 24; limit++)
            Same(plain.Generate(prompts[..2], EngineHarness.Greedy(limit)), spec.Generate(prompts[..2], EngineHarness.Greedy(limit)));

        // A stop string from the middle of a plain output: the output ends there on both.
        var text = full[0].Outputs[0].Text;
        var stop = text.Substring(text.Length / 2, 6);
        var stopped = new SamplingParams { Temperature = 0, MaxTokens = 300, Stop = [stop] };
        var p = plain.Generate(prompts, stopped);
        Assert.Equal(stop, p[0].Outputs[0].StopReason);
        Same(p, spec.Generate(prompts, stopped));

        // Stop token ids taken from along the plain output (some end the output inside a run of accepted drafts, whose
        // later tokens must then go), and stop strings likewise.
        var ids = full[0].Outputs[0].TokenIds;
        for (int at = 3; at < Math.Min(ids.Count, 60); at += 3)
        {
            var byToken = new SamplingParams { Temperature = 0, MaxTokens = 300, StopTokenIds = [ids[at]] };
            Same(plain.Generate(prompts[..1], byToken), spec.Generate(prompts[..1], byToken));
            var byText = new SamplingParams { Temperature = 0, MaxTokens = 300, Stop = [text.Substring(at * text.Length / ids.Count, 3)] };
            Same(plain.Generate(prompts[..1], byText), spec.Generate(prompts[..1], byText));
        }
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// A stop string completed by a token that the step made as an accepted draft, with more tokens after it in the
    /// same step: the output ends at the stop as the plain engine's does (the step's later tokens are dropped).
    /// </summary>
    [Fact]
    public void A_stop_inside_a_run_of_accepted_drafts_drops_the_tokens_after_it()
    {
        // A 100-token story opening: the continuation copies names and phrases from it, so drafts bring tokens the
        // output has not had yet.
        IReadOnlyList<int> prompt = Fixtures.Ints(Fixtures.Reference("stories260K")["cases"]![5]!["prompt_ids"]);
        using var plain = Engine(speculate: false);
        var ids = plain.Generate([prompt], EngineHarness.Greedy(200))[0].Outputs[0].TokenIds.ToArray();
        using var spec = Engine(speculate: true);
        // Step by step: where a step added several tokens, all but its last were accepted drafts.
        var id = spec.Engine.AddRequest(prompt, EngineHarness.Greedy(200));
        var added = new List<(int From, int Count)>();
        int have = 0;
        while (spec.Engine.HasUnfinishedRequests)
            foreach (var o in spec.Engine.Step())
                if (o.RequestId == id && o.Outputs[0].TokenIds.Count > have)
                {
                    Assert.Equal(ids[have..o.Outputs[0].TokenIds.Count], o.Outputs[0].TokenIds.Skip(have));
                    added.Add((have, o.Outputs[0].TokenIds.Count - have));
                    have = o.Outputs[0].TokenIds.Count;
                }
        // Stop strings that first appear with a draft that has more tokens after it in its step: the text of that
        // draft and the token before it, when the output's text up to the token before does not already hold it.
        var tokenizer = spec.Engine.Tokenizer!;
        string Text(int count) => tokenizer.Decode(ids[..count]);
        var drafts = added.Where(a => a.Count > 1).SelectMany(a => Enumerable.Range(a.From, a.Count - 1)).Where(p => p >= 1).ToHashSet();
        var stops = new List<string>();
        foreach (int p in drafts.Order())
        {
            string before = Text(p - 1), through = Text(p + 1);
            if (!through.StartsWith(before, StringComparison.Ordinal)) continue;
            string stop = through[before.Length..];
            if (stop.Trim().Length >= 2 && !Text(p).Contains(stop, StringComparison.Ordinal)) stops.Add(stop);
            if (stops.Count == 4) break;
        }
        Assert.NotEmpty(stops);

        foreach (var stop in stops)
        {
            var stopped = new SamplingParams { Temperature = 0, MaxTokens = 200, IgnoreEos = true, Stop = [stop] };
            var x = plain.Generate([prompt], stopped)[0].Outputs[0];
            var y = spec.Generate([prompt], stopped)[0].Outputs[0];
            Assert.Equal(stop, x.StopReason);
            Assert.Contains(x.TokenIds.Count - 1, drafts); // the plain run stopped on a token the speculative run made as a draft
            Assert.Equal(x.TokenIds, y.TokenIds);
            Assert.Equal((x.Text, x.FinishReason, x.StopReason), (y.Text, y.FinishReason, y.StopReason));
        }
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// Greedy requests under a structured-output constraint speculate too: drafts are cut where the grammar refuses them
    /// or forces what comes next (jump-forward's part), each row is checked under the mask its drafts lead to, and the
    /// output is the plain engine's, token for token (a JSON array of objects with repeated values: the lookup predicts them; on the
    /// Qwen3 tokenizer, where jump-forward writes the key names).
    /// </summary>
    [Fact]
    public void Constrained_greedy_output_is_the_plain_engines_with_drafts_accepted()
    {
        const string schema = """
            {"type": "array", "minItems": 6, "maxItems": 8, "items": {"type": "object", "additionalProperties": false,
             "required": ["dessert_of_the_day", "served_warm"],
             "properties": {"dessert_of_the_day": {"enum": ["apple pie", "banana bread", "cherry tart"]}, "served_warm": {"type": "boolean"}}}}
            """;
        string[] prompts = ["Once upon a time", "Lily and Ben went to the park", "The little dog"];
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = 300, StructuredOutputs = StructuredOutputs.ForJsonSchema(schema) };
        using var plain = Engine(speculate: false, model: "tiny-qwen3-chat");
        using var spec = Engine(speculate: true, model: "tiny-qwen3-chat");
        var x = plain.Generate(prompts, sampling);
        var y = spec.Generate(prompts, sampling);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(x[i].Outputs[0].TokenIds, y[i].Outputs[0].TokenIds);
            Assert.Equal(x[i].Outputs[0].Text, y[i].Outputs[0].Text);
            Assert.Equal(x[i].Outputs[0].FinishReason, y[i].Outputs[0].FinishReason);
            Assert.True(Json.Schema.JsonSchema.FromText(schema).Evaluate(System.Text.Json.JsonDocument.Parse(y[i].Outputs[0].Text).RootElement).IsValid, y[i].Outputs[0].Text);
        }
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0, "no draft was accepted");
        Assert.True(spec.Engine.Counters.JumpForwardTokens > 0, "nothing was jumped forward: the test does not cover drafts beside jump-forward");
        // The same forced text written by jump-forward in both: drafts never run into a forced state (the proposer cuts
        // them there), so the forced text after a speculative step's last token is jumped, as after a plain step.
        Assert.Equal(plain.Engine.Counters.JumpForwardTokens, spec.Engine.Counters.JumpForwardTokens);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// Where a speculative step's own last token leads the grammar into forced text (a draft never does: the proposer
    /// cuts drafts there), jump-forward writes that text as after a plain step: greedy output under a regex whose
    /// sentences repeat, equal to the plain engine's token for token, with as many tokens jumped forward.
    /// </summary>
    [Fact]
    public void After_a_speculative_step_the_forced_text_is_jumped_forward_as_after_a_plain_step()
    {
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = 120, StructuredOutputs = StructuredOutputs.ForRegex(@"((Lily|Ben|Tom) (ran to the park|sat on the mat)\. ){10}") };
        string[] prompts = ["Lily ran to the park. Ben sat on the mat. Lily ran to the park.", "Tom sat on the mat. Tom sat on the mat.", "Once upon a time"];
        using var plain = Engine(speculate: false, model: "tiny-qwen3-chat");
        using var spec = Engine(speculate: true, model: "tiny-qwen3-chat");
        var x = plain.Generate(prompts, sampling);
        var y = spec.Generate(prompts, sampling);
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(x[i].Outputs[0].TokenIds, y[i].Outputs[0].TokenIds);
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0, "no draft was accepted");
        Assert.True(plain.Engine.Counters.JumpForwardTokens > 0, "nothing was jumped forward");
        Assert.Equal(plain.Engine.Counters.JumpForwardTokens, spec.Engine.Counters.JumpForwardTokens);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>Requests that cannot speculate (sampled, penalized, with logprobs) batched with ones that do: each as on the plain engine.</summary>
    [Fact]
    public void Requests_that_cannot_speculate_share_the_batch_unchanged()
    {
        string[] prompts = ["Once upon a time", "Lily and Ben went to the park", "The little dog", "Once upon a time"];
        SamplingParams[] samplings =
        [
            EngineHarness.Greedy(120),
            new() { Temperature = 0.8f, TopP = 0.9f, Seed = 7, MaxTokens = 120, IgnoreEos = true },
            new() { Temperature = 0, RepetitionPenalty = 1.3f, MaxTokens = 120, IgnoreEos = true },
            new() { Temperature = 0, Logprobs = 2, MaxTokens = 60, IgnoreEos = true },
        ];
        using var plain = Engine(speculate: false);
        using var spec = Engine(speculate: true);
        var x = plain.Generate(prompts, samplings);
        var y = spec.Generate(prompts, samplings);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(x[i].Outputs[0].TokenIds, y[i].Outputs[0].TokenIds);
            Assert.Equal(x[i].Outputs[0].Text, y[i].Outputs[0].Text);
        }
        Assert.Equal(x[3].Outputs[0].Logprobs!.Select(l => l.Logprob), y[3].Outputs[0].Logprobs!.Select(l => l.Logprob));
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// Blocks written during speculation enter the prefix cache only as far as the accepted tokens go: a prompt made of
    /// a speculated output is served from those blocks and continues as a fresh plain engine continues it.
    /// </summary>
    [Fact]
    public void The_prefix_cache_holds_only_accepted_tokens()
    {
        var prompt = Fixtures.Ints(Fixtures.Reference("stories260K")["cases"]![0]!["prompt_ids"]);
        using var spec = Engine(speculate: true, o => o.BlockSize = 4);
        var first = spec.Generate([(IReadOnlyList<int>)prompt], EngineHarness.Greedy(120))[0];
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0);
        int[] longer = [.. prompt, .. first.Outputs[0].TokenIds];
        var again = spec.Generate([(IReadOnlyList<int>)longer], EngineHarness.Greedy(40))[0];
        Assert.True(again.NumCachedTokens >= (longer.Length - 1) / 4 * 4 - 4, $"only {again.NumCachedTokens} of {longer.Length} prompt tokens were cached");

        using var plain = Engine(speculate: false, o => { o.BlockSize = 4; o.EnablePrefixCaching = false; });
        Assert.Equal(plain.Generate([(IReadOnlyList<int>)longer], EngineHarness.Greedy(40))[0].Outputs[0].TokenIds, again.Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>A cache too small for the batch: sequences are preempted and recomputed, drafts and all, with the plain engine's output.</summary>
    [Fact]
    public void Preemption_under_block_pressure_keeps_the_output()
    {
        string[] prompts = ["Once upon a time", "Lily and Ben went to the park", "The little dog", "Tom had a red ball"];
        void Small(EngineOptions o) { o.BlockSize = 4; o.NumKvBlocks = 96; o.KvCacheMemoryBytes = null; o.MaxModelLen = 256; }
        using var plain = Engine(speculate: false, Small);
        using var spec = Engine(speculate: true, Small);
        var x = plain.Generate(prompts, EngineHarness.Greedy(160));
        var y = spec.Generate(prompts, EngineHarness.Greedy(160));
        Assert.True(spec.Engine.GetStats().Preemptions > 0, "the cache was large enough: nothing was preempted");
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(x[i].Outputs[0].TokenIds, y[i].Outputs[0].TokenIds);
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0);
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// Drafts never take the block another running sequence's next token needs: with one block free, A's drafts (which
    /// would need it) are dropped and B, which needs it for its next token, decodes without anyone being preempted.
    /// Stepped by hand on the scheduler (no forward pass), so the counts are exact.
    /// </summary>
    [Fact]
    public void Drafts_never_take_the_block_another_sequences_next_token_needs()
    {
        var blocks = new BlockManager(numBlocks: 4, blockSize: 4, enablePrefixCaching: false, salt: 0);
        var scheduler = new Scheduler(blocks, maxNumBatchedTokens: 64, maxNumSeqs: 8)
        {
            Speculation = new NgramProposer(numSpeculativeTokens: 4, minN: 2, maxN: 4, maxModelLen: 1000),
        };
        var a = new Sequence("a", 0, [1, 2, 3, 4, 1, 2, 3], EngineHarness.Greedy(100), 0);
        var b = new Sequence("b", 0, [9, 8, 7, 6], EngineHarness.Greedy(100), 1);
        scheduler.Add(a);
        scheduler.Add(b);
        var first = scheduler.Schedule(); // both prefills: 2 + 1 blocks, one left
        scheduler.Update(first, [new SampledToken(4, null), new SampledToken(5, null)]);
        Assert.Equal(1, blocks.NumFreeBlocks);

        // A's lookup finds [1, 2, 3, 4] again (its drafts would need a third block); B's next token needs its second.
        Assert.Equal([1, 2, 3, 4], scheduler.Speculation!.Propose(a, 64)!);
        var second = scheduler.Schedule();
        Assert.Equal(0, scheduler.NumPreemptions);
        Assert.Equal([("a", 1, false), ("b", 1, false)], second.Select(s => (s.Sequence.RequestId, s.NumNewTokens, s.Drafts is not null)));

        // vLLM's disable_by_batch_size: with two running and a limit of 2, nobody drafts (even with blocks to spare).
        var limited = new Scheduler(new BlockManager(numBlocks: 64, blockSize: 4, enablePrefixCaching: false, salt: 0), maxNumBatchedTokens: 64, maxNumSeqs: 8)
        {
            Speculation = new NgramProposer(numSpeculativeTokens: 4, minN: 2, maxN: 4, maxModelLen: 1000, disableByBatchSize: 2),
        };
        var c = new Sequence("c", 0, [1, 2, 3, 4, 1, 2, 3], EngineHarness.Greedy(100), 0);
        var d = new Sequence("d", 0, [1, 2, 3, 4, 1, 2, 3], EngineHarness.Greedy(100), 1);
        limited.Add(c);
        limited.Add(d);
        var both = limited.Schedule();
        limited.Update(both, [new SampledToken(4, null), new SampledToken(4, null)]);
        Assert.All(limited.Schedule(), s => Assert.Null(s.Drafts));

        // Alone, A gets its drafts: they need a new block and nobody else is waiting for one.
        scheduler.Update(second, [new SampledToken(1, null), new SampledToken(5, null)]);
        scheduler.Finish(b, FinishReasons.Abort);
        var third = scheduler.Schedule();
        Assert.NotNull(Assert.Single(third).Drafts);
        scheduler.Finish(a, FinishReasons.Abort);
        blocks.CheckInvariants(expectAllFree: true);
    }

    [Fact]
    public void The_proposer_follows_the_latest_earlier_occurrence_of_the_longest_suffix()
    {
        Sequence Seq(int[] tokens, int maxTokens = 100, int prompt = 0)
        {
            var s = new Sequence("r", 0, tokens[..prompt], new SamplingParams { Temperature = 0, MaxTokens = maxTokens }, 0);
            foreach (var t in tokens[prompt..]) s.Append(t);
            return s;
        }
        var proposer = new NgramProposer(numSpeculativeTokens: 3, minN: 2, maxN: 3, maxModelLen: 1000);
        // Suffix [7, 8, 9] occurred at 1 (followed by 1, 2) and at 6 (followed by 5, 5, 6): the latest wins.
        Assert.Equal([5, 5, 6], proposer.Propose(Seq([0, 7, 8, 9, 1, 2, 7, 8, 9, 5, 5, 6, 4, 7, 8, 9]), 10)!);
        // Only the 2-token suffix [3, 4] occurred before: what followed it, as many as allowed.
        Assert.Equal([9, 2, 3], proposer.Propose(Seq([1, 3, 4, 9, 2, 3, 4]), 10)!);
        Assert.Null(proposer.Propose(Seq([1, 2, 3, 4, 5, 6]), 10)); // nothing repeats
        Assert.Equal([1], proposer.Propose(Seq([1, 2, 1, 2, 1, 2]), 1)!); // the step's budget
        // The token limit: two more tokens may come, one of them the step's own sample, so one draft.
        Assert.Equal([5], proposer.Propose(Seq([4, 5, 6, 4, 5, 6, 4], maxTokens: 9), 10)!);
        Assert.Null(proposer.Propose(Seq([4, 5, 6, 4, 5, 6, 4], maxTokens: 8), 10));
        // A seeded sampled request does not speculate (its tokens must not depend on the batch); an unseeded one does.
        var seeded = new Sequence("r", 0, [1, 2, 1, 2, 1], new SamplingParams { Temperature = 1, Seed = 3 }, 0);
        Assert.Null(proposer.Propose(seeded, 10));
        var unseeded = new Sequence("r", 0, [1, 2, 1, 2, 1], new SamplingParams { Temperature = 1 }, 0);
        Assert.Equal([2, 1], proposer.Propose(unseeded, 10)!);
    }

    /// <summary>
    /// The sampled check keeps each position's distribution the model's: over many draws (a fixed seed), the token at
    /// position 0 follows row 0 whatever the draft, and the token at position 1, where position 0 kept its draft,
    /// follows row 1; a draft the model gives no mass is never kept.
    /// </summary>
    [Fact]
    public void Sampled_drafts_keep_the_models_distribution_at_every_position()
    {
        float[][] probs = [[0.5f, 0.3f, 0.2f, 0f], [0.1f, 0.6f, 0f, 0.3f], [0.25f, 0.25f, 0.25f, 0.25f]];
        var random = new Random(11);
        foreach (int[] drafts in new[] { new[] { 0, 1 }, [1, 3], [2, 2], [3, 0] })
        {
            var first = new double[4];
            var second = new double[4];
            int n = 200_000, kept0 = 0;
            for (int k = 0; k < n; k++)
            {
                var (accepted, next) = DraftVerifier.Sampled(r => probs[r], drafts, random);
                first[accepted >= 1 ? drafts[0] : next]++;
                if (accepted >= 1)
                {
                    kept0++;
                    second[accepted >= 2 ? drafts[1] : next]++;
                }
            }
            for (int t = 0; t < 4; t++)
            {
                Assert.True(Math.Abs(first[t] / n - probs[0][t]) < 0.005, $"drafts [{string.Join(",", drafts)}]: token {t} at position 0 came {first[t] / n:F4} of the time, not {probs[0][t]}");
                if (kept0 > 10_000)
                    Assert.True(Math.Abs(second[t] / kept0 - probs[1][t]) < 0.01, $"drafts [{string.Join(",", drafts)}]: token {t} at position 1 came {second[t] / kept0:F4} of the time, not {probs[1][t]}");
            }
            if (probs[0][drafts[0]] == 0) Assert.Equal(0, kept0);
        }
        // Greedy: drafts stand while they are the argmax; the next token is the argmax where one failed.
        Assert.Equal((1, 7), DraftVerifier.Greedy([4, 7, 9], [4, 5]));
        Assert.Equal((2, 9), DraftVerifier.Greedy([4, 7, 9], [4, 7]));
        Assert.Equal((0, 4), DraftVerifier.Greedy([4, 7, 9], [5, 7]));
    }

    /// <summary>
    /// Sampled requests speculate too (unseeded): drafts are accepted, and over many requests the output matches the
    /// plain engine's in what speculation could bias: how often a token is the one prompt lookup predicts (what followed
    /// the last earlier occurrence of the two tokens before it), and the tokens' frequencies (a two-proportion z-test
    /// and a two-sample chi-square over the commonest tokens, at thresholds chance alone reaches about once in a
    /// billion runs).
    /// </summary>
    [Fact]
    public void Sampled_requests_speculate_with_the_plain_engines_token_frequencies()
    {
        string[] prompts = Enumerable.Repeat("Once upon a time, there was a little girl named Lily. Lily liked to play. One day, Lily", 256).ToArray();
        var sampling = new SamplingParams { Temperature = 0.8f, TopP = 0.95f, MaxTokens = 24, IgnoreEos = true };
        using var plain = Engine(speculate: false);
        using var spec = Engine(speculate: true);
        (Dictionary<int, int> Counts, int Predicted, int Predictable) Run(Llm llm)
        {
            var outputs = llm.Generate(prompts, sampling);
            int predicted = 0, predictable = 0;
            foreach (var o in outputs)
            {
                int[] all = [.. o.PromptTokenIds, .. o.Outputs[0].TokenIds];
                for (int p = o.PromptTokenIds.Count + 1; p < all.Length; p++)
                {
                    // What prompt lookup would have proposed at p: the token after the last earlier occurrence of all[p-2..p).
                    int at = all.AsSpan(0, p - 1).LastIndexOf(all.AsSpan(p - 2, 2));
                    if (at < 0) continue;
                    predictable++;
                    if (all[at + 2] == all[p]) predicted++;
                }
            }
            return (outputs.SelectMany(o => o.Outputs[0].TokenIds.Skip(1)).GroupBy(t => t).ToDictionary(g => g.Key, g => g.Count()), predicted, predictable);
        }
        var (a, pa, na0) = Run(plain);
        var (b, pb, nb0) = Run(spec);
        Assert.True(spec.Engine.GetStats().SpecAcceptedTokens > 0, "no draft was accepted");
        double ra = (double)pa / na0, rb = (double)pb / nb0, pooled = (double)(pa + pb) / (na0 + nb0);
        double z = (rb - ra) / Math.Sqrt(pooled * (1 - pooled) * (1.0 / na0 + 1.0 / nb0));
        Assert.True(Math.Abs(z) < 6.5, $"tokens were the lookup's prediction {rb:P1} of the time with speculation and {ra:P1} without (z = {z:F1})");
        var top = a.Keys.Union(b.Keys).OrderByDescending(t => a.GetValueOrDefault(t) + b.GetValueOrDefault(t)).Take(30).ToList();
        double chi = 0;
        long na = a.Values.Sum(), nb = b.Values.Sum();
        foreach (var bin in top.Select(t => ((double)a.GetValueOrDefault(t), (double)b.GetValueOrDefault(t)))
                     .Append((na - top.Sum(t => (double)a.GetValueOrDefault(t)), nb - top.Sum(t => (double)b.GetValueOrDefault(t)))))
        {
            double total = bin.Item1 + bin.Item2;
            if (total == 0) continue;
            double ea = total * na / (na + nb), eb = total * nb / (na + nb);
            chi += (bin.Item1 - ea) * (bin.Item1 - ea) / ea + (bin.Item2 - eb) * (bin.Item2 - eb) / eb;
        }
        Assert.True(chi < 110, $"chi-square {chi:F1} over 31 bins: the speculative engine's token frequencies differ from the plain engine's");
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    /// <summary>
    /// Sampled requests under a structured-output constraint speculate too: each draft stands with its probability under
    /// the mask its earlier drafts lead to. Over many requests the outputs match the plain engine's in what the regex
    /// leaves to chance (which name and verb each sentence takes: a two-sample chi-square over the nine pairs, and over
    /// whether a sentence repeats the one before it, what prompt lookup predicts); every output matches the regex.
    /// </summary>
    [Fact]
    public void Sampled_constrained_requests_speculate_with_the_plain_engines_choices()
    {
        const string regex = @"((Lily|Ben|Tom) (ran|sat|played)\. ){12}";
        string[] prompts = Enumerable.Repeat("Lily ran. Lily ran. Ben sat. Lily ran. Tom played. Lily ran.", 512).ToArray();
        var sampling = new SamplingParams { Temperature = 1.0f, MaxTokens = 120, StructuredOutputs = StructuredOutputs.ForRegex(regex) };
        using var plain = Engine(speculate: false);
        using var spec = Engine(speculate: true);
        (Dictionary<string, int> Pairs, int Repeats, int Sentences) Run(Llm llm)
        {
            var pairs = new Dictionary<string, int>();
            int repeats = 0, sentences = 0;
            foreach (var o in llm.Generate(prompts, sampling))
            {
                var text = o.Outputs[0].Text;
                Assert.Matches("^" + regex + "$", text);
                var parts = text.Split(". ", StringSplitOptions.RemoveEmptyEntries);
                for (int i = 0; i < parts.Length; i++)
                {
                    pairs[parts[i]] = pairs.GetValueOrDefault(parts[i]) + 1;
                    sentences++;
                    if (i > 0 && parts[i] == parts[i - 1]) repeats++;
                }
            }
            return (pairs, repeats, sentences);
        }
        var (a, ra, na) = Run(plain);
        var before = spec.Engine.GetStats();
        var (b, rb, nb) = Run(spec);
        var after = spec.Engine.GetStats();
        Assert.True(after.SpecAcceptedTokens > before.SpecAcceptedTokens, "no draft was accepted: the test does not cover constrained sampled drafts");
        double chi = 0;
        foreach (var key in a.Keys.Union(b.Keys))
        {
            double x = a.GetValueOrDefault(key), y = b.GetValueOrDefault(key), total = x + y;
            double ex = total * na / (na + nb), ey = total * nb / (na + nb);
            chi += (x - ex) * (x - ex) / ex + (y - ey) * (y - ey) / ey;
        }
        Assert.True(chi < 60, $"chi-square {chi:F1} over the name-verb pairs: the speculative engine's choices differ from the plain engine's");
        double pa = (double)ra / na, pb = (double)rb / nb, pooled = (double)(ra + rb) / (na + nb);
        double z = (pb - pa) / Math.Sqrt(pooled * (1 - pooled) * (1.0 / na + 1.0 / nb));
        Assert.True(Math.Abs(z) < 6.5, $"a sentence repeated the one before {pb:P1} of the time with speculation and {pa:P1} without (z = {z:F1})");
        EngineHarness.AssertNoLeaks(spec.Engine);
    }

    [Theory]
    [InlineData("""{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}""", 5, 3, 2)]
    [InlineData("""{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 1}""", 2, 1, 1)]
    [InlineData("""{"num_speculative_tokens": 3, "prompt_lookup_min": 3, "prompt_lookup_max": 6, "disable_by_batch_size": 8}""", 3, 6, 3)]
    public void Vllms_speculative_config_is_read(string json, int tokens, int max, int min)
    {
        var c = SpeculativeConfig.Parse(json);
        Assert.Equal((tokens, max, min), (c.NumSpeculativeTokens, c.PromptLookupMax, c.PromptLookupMin));
    }

    [Theory]
    [InlineData("""{"method": "eagle", "num_speculative_tokens": 3}""", "eagle")]
    [InlineData("""{"method": "ngram", "model": "x"}""", "model")]
    [InlineData("""{"num_speculative_tokens": 0}""", "NumSpeculativeTokens")]
    [InlineData("""{"prompt_lookup_min": 4, "prompt_lookup_max": 2}""", "PromptLookupMin")]
    [InlineData("""{"disable_by_batch_size": 1}""", "DisableByBatchSize")]
    [InlineData("""{"method": "ngram",""", "not valid JSON")]
    public void A_speculative_config_that_cannot_be_served_is_refused_by_name(string json, string named)
    {
        var e = Assert.ThrowsAny<ArgumentException>(() => SpeculativeConfig.Parse(json));
        Assert.Contains(named, e.Message);
    }
}
