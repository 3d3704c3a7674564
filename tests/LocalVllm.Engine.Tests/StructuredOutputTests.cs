using System.Text;
using System.Text.Json.Nodes;
using Json.Schema;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Execution;
using LocalVllm.Engine.Structured;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Structured outputs in the engine: greedy constrained decoding against a direct computation (the model's logits at
/// every position, masked by trying each token on its own), outputs against an independent validator (JsonSchema.Net),
/// and the constraint together with batching, n > 1, preemption, prefix caching, stop strings, logprobs, aborts and
/// MaxTokens.
/// </summary>
public class StructuredOutputTests
{
    // A finite language (enum, bounded integer, bounded string): every run ends by completing the object.
    private const string Schema = """
        {"type": "object", "properties": {
            "mood": {"enum": ["happy", "sad", "sleepy"]},
            "age": {"type": "integer", "minimum": 1, "maximum": 99},
            "name": {"type": "string", "maxLength": 5},
            "pets": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
         "required": ["mood", "age", "name"], "additionalProperties": false}
        """;

    private static readonly StructuredOutputs Constraint = StructuredOutputs.ForJsonSchema(Schema);

    private static SamplingParams Greedy(int max = 80) => new() { Temperature = 0, MaxTokens = max, StructuredOutputs = Constraint };

    private static void AssertValid(string schema, string text)
    {
        var result = JsonSchema.FromText(schema).Evaluate(System.Text.Json.JsonDocument.Parse(text).RootElement, new EvaluationOptions { RequireFormatValidation = true });
        Assert.True(result.IsValid, $"not valid under the schema: {text}");
    }

    [Fact]
    public void Greedy_constrained_decoding_is_the_argmax_over_allowed_tokens_and_validates()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt("Once upon a time, a little cat");
        var output = llm.Generate([prompt], Greedy())[0].Outputs[0];
        Assert.Equal(FinishReasons.Stop, output.FinishReason);
        AssertValid(Schema, output.Text);

        // Reference: at each position, the model's logits for the whole sequence so far (an unbatched dense pass),
        // restricted to the tokens a fresh matcher can advance by (EOS where the match is complete), then argmax.
        var vocab = engine.Vocabulary!;
        var matcher = new GrammarMatcher(ConstraintCompiler.Compile(Constraint), vocab);
        var ids = prompt.ToList();
        var expected = new List<int>();
        var eos = engine.Directory.EosTokenIds.ToHashSet();
        while (!matcher.IsTerminated && expected.Count < 80)
        {
            var logits = EngineHarness.AllPositionLogits(engine, [.. ids])[^1];
            int best = -1;
            for (int t = 0; t < logits.Length; t++)
            {
                bool allowed = eos.Contains(t) ? matcher.IsAccepting : matcher.Allows(t);
                if (allowed && (best < 0 || logits[t] > logits[best])) best = t;
            }
            expected.Add(best);
            if (eos.Contains(best)) break;
            Assert.True(matcher.TryAdvance(best));
            ids.Add(best);
        }
        Assert.Equal(expected.Where(t => !eos.Contains(t)), output.TokenIds.Where(t => !eos.Contains(t)));
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void Constrained_and_unconstrained_requests_share_steps_and_each_gets_its_own_tokens()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var engine = llm.Engine;
        var p1 = engine.EncodePrompt("Once upon a time, a little cat");
        var p2 = engine.EncodePrompt("The dog ran to the park");
        var regex = new SamplingParams { Temperature = 0, MaxTokens = 40, StructuredOutputs = StructuredOutputs.ForRegex("(The|A) [a-z]+ (is|was) [a-z]+\\.") };
        var plain = new SamplingParams { Temperature = 0, MaxTokens = 20, IgnoreEos = true };
        var alone = new[] { llm.Generate([p1], Greedy())[0], llm.Generate([p2], regex)[0], llm.Generate([p1], plain)[0] };

        var ids = new[] { engine.AddRequest(p1, Greedy()), engine.AddRequest(p2, regex), engine.AddRequest(p1, plain) };
        var final = new Dictionary<string, RequestOutput>();
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step().Where(o => o.Finished)) final[o.RequestId] = o;
        for (int i = 0; i < 3; i++) Assert.Equal(alone[i].Outputs[0].TokenIds, final[ids[i]].Outputs[0].TokenIds);
        Assert.Matches("^(The|A) [a-z]+ (is|was) [a-z]+\\.$", final[ids[1]].Outputs[0].Text);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void Seeded_sampling_with_n3_gives_valid_completions_each_with_its_own_matcher()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var prompt = llm.Engine.EncodePrompt("Once upon a time");
        var sampling = new SamplingParams { Temperature = 1.0f, Seed = 11, N = 3, MaxTokens = 80, StructuredOutputs = Constraint };
        var outputs = llm.Generate([prompt], sampling)[0].Outputs;
        Assert.Equal(3, outputs.Count);
        foreach (var o in outputs)
        {
            Assert.Equal(FinishReasons.Stop, o.FinishReason);
            AssertValid(Schema, o.Text);
        }
        // Seeded: the same request again gives the same three completions.
        Assert.Equal(outputs.Select(o => o.Text), llm.Generate([prompt], sampling)[0].Outputs.Select(o => o.Text));
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Preempted_and_prefix_cached_constrained_requests_produce_the_same_tokens_as_alone()
    {
        // Eight blocks of 16 tokens for four requests of 30-token prompts growing by up to ~40 tokens: preemption must
        // happen; the matcher stays with the sequence while its KV is recomputed.
        using var small = new Llm(EngineHarness.Options("stories260K", o => { o.NumKvBlocks = 10; o.BlockSize = 16; }));
        using var reference = new Llm(EngineHarness.Options("stories260K"));
        var prompts = new[] { "Once upon a time, there was a little girl named Lily. She", "The sun was shining and the birds sang in the tall green trees", "Tom had a red ball and he liked to play with it in the garden", "Once upon a time, there was a little girl named Lily. She" }
            .Select(p => (IReadOnlyList<int>)reference.Engine.EncodePrompt(p)).ToArray();
        var expected = prompts.Select(p => reference.Generate([p], Greedy())[0].Outputs[0].TokenIds.ToArray()).ToArray();
        var outputs = small.Generate(prompts, Greedy());
        Assert.True(small.Engine.Scheduler.NumPreemptions > 0, "the cache was meant to force preemption");
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(expected[i], outputs[i].Outputs[0].TokenIds);

        // The same prompt again: its blocks come from the prefix cache, the output is unchanged.
        var again = reference.Generate([prompts[0]], Greedy())[0];
        Assert.True(again.NumCachedTokens > 0);
        Assert.Equal(expected[0], again.Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(small.Engine);
        EngineHarness.AssertNoLeaks(reference.Engine);
    }

    [Fact]
    public void Stop_strings_logprobs_max_tokens_and_aborts_keep_working_with_a_constraint()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt("Once upon a time, a little cat");
        var full = llm.Generate([prompt], Greedy())[0].Outputs[0];

        // A stop string cuts the constrained text where it first appears.
        var cut = llm.Generate([prompt], Greedy() with { Stop = ["\"age\""] })[0].Outputs[0];
        Assert.Equal(FinishReasons.Stop, cut.FinishReason);
        Assert.Equal(full.Text[..full.Text.IndexOf("\"age\"", StringComparison.Ordinal)], cut.Text);

        // Log-probabilities are the model's raw ones for the tokens the constraint let through.
        var withLogprobs = llm.Generate([prompt], Greedy() with { Logprobs = 2 })[0].Outputs[0];
        Assert.Equal(full.TokenIds, withLogprobs.TokenIds);
        var rows = EngineHarness.AllPositionLogits(engine, [.. prompt, .. full.TokenIds]);
        for (int i = 0; i < 3; i++)
        {
            var row = rows[prompt.Length - 1 + i];
            double max = row.Max();
            double logSum = max + Math.Log(row.Sum(v => Math.Exp(v - max)));
            Assert.Equal(row[full.TokenIds[i]] - logSum, withLogprobs.Logprobs![i].Logprob, 3);
        }

        // MaxTokens inside the value: finish reason "length", and the text is not claimed complete.
        var shortRun = llm.Generate([prompt], Greedy(3))[0].Outputs[0];
        Assert.Equal(FinishReasons.Length, shortRun.FinishReason);
        Assert.Equal(full.TokenIds.Take(3), shortRun.TokenIds);

        // An abort mid-way frees everything.
        var id = engine.AddRequest(prompt, Greedy());
        engine.Step();
        engine.Step();
        Assert.Equal(FinishReasons.Abort, engine.Abort(id)!.Outputs[0].FinishReason);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void A_bad_constraint_is_refused_before_queueing_and_disturbs_nothing()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt("Once upon a time");
        var running = engine.AddRequest(prompt, Greedy());
        engine.Step();
        var e = Assert.ThrowsAny<ArgumentException>(() => engine.AddRequest(prompt, Greedy() with { StructuredOutputs = StructuredOutputs.ForJsonSchema("""{"type": "object", "dependencies": {"a": ["b"]}}""") }));
        Assert.Contains("'dependencies'", e.Message, StringComparison.Ordinal);
        Assert.Contains("StructuredOutputs", e.Message, StringComparison.Ordinal);
        e = Assert.ThrowsAny<ArgumentException>(() => engine.AddRequest(prompt, Greedy() with { StructuredOutputs = new StructuredOutputs { Regex = "a", Json = "{}" } }));
        Assert.Contains("exactly one", e.Message, StringComparison.Ordinal);
        RequestOutput? last = null;
        while (engine.HasUnfinishedRequests) last = engine.Step().LastOrDefault() ?? last;
        Assert.Equal(running, last!.RequestId);
        Assert.Equal(FinishReasons.Stop, last.Outputs[0].FinishReason);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void A_random_model_under_real_schemas_only_writes_instances_that_validate()
    {
        // tiny-qwen3-chat: random weights over the real Qwen3 vocabulary. Schemas: MaskBench's function-calling
        // schemas (BFCL) that compile; every completed output must be valid for JsonSchema.Net.
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt("<|im_start|>user\nCall the tool.<|im_end|>\n<|im_start|>assistant\n");
        int completed = 0, runs = 0;
        foreach (var file in Directory.GetFiles(Path.Combine(Fixtures.Root, "maskbench", "cases"), "BFCL_*.json").Order(StringComparer.Ordinal).Take(24))
        {
            var schema = JsonNode.Parse(File.ReadAllText(file))!["schema"]!.ToJsonString();
            var c = StructuredOutputs.ForJsonSchema(schema);
            try
            {
                ConstraintCompiler.Compile(c);
            }
            catch (GrammarException)
            {
                continue;
            }
            runs++;
            var o = llm.Generate([prompt], new SamplingParams { Temperature = 1, Seed = runs, MaxTokens = 120, StructuredOutputs = c })[0].Outputs[0];
            if (o.FinishReason != FinishReasons.Stop) continue;
            completed++;
            AssertValid(schema, o.Text);
        }
        Assert.True(runs >= 20, $"only {runs} schemas compiled");
        // A random model completes an object only by chance (open strings); those that do must all be valid.
        Assert.True(completed >= 3, $"only {completed} of {runs} outputs completed within 120 tokens");
        EngineHarness.AssertNoLeaks(engine);
    }

    /// <summary>
    /// The two ways the sampler masks a row give the same result: in place on float32 CPU logits (the CPU engine's),
    /// and through a bias row for other dtypes and devices (here bfloat16 logits): -inf exactly where the mask refuses,
    /// the logits unchanged elsewhere, other rows untouched.
    /// </summary>
    [Fact]
    public void Masking_in_place_and_through_a_bias_row_agree()
    {
        var vocab = new TokenVocabulary([[(byte)'a'], [(byte)'b'], [(byte)'c'], [(byte)'x'], "ab"u8.ToArray()], 70);
        Sequence Constrained() => new("r", 0, [0], new SamplingParams { Temperature = 0 }, 0)
        {
            Constraint = new SequenceConstraint(new GrammarMatcher(ConstraintCompiler.Compile(StructuredOutputs.ForRegex("a[bc]x?")), vocab), [69], null),
        };
        var free = new Sequence("free", 0, [0], new SamplingParams { Temperature = 0 }, 0);
        using var logits = arange(140, dtype: ScalarType.Float32).reshape(2, 70) / 10f;
        var expected = logits.clone();
        expected[0].index_fill_(0, tensor(Enumerable.Range(0, 70).Where(t => t is not (0 or 4)).Select(t => (long)t).ToArray()), float.NegativeInfinity);
        using var inPlace = Sampler.ApplyConstraints(logits, [Constrained(), free]);
        using var viaBias = Sampler.ApplyConstraints(logits.to(ScalarType.BFloat16), [Constrained(), free]).to(ScalarType.Float32);
        Assert.True(inPlace.equal(expected).all().item<bool>());
        Assert.True(viaBias.equal(expected.to(ScalarType.BFloat16).to(ScalarType.Float32)).all().item<bool>());
        Assert.True(logits[0].isfinite().all().item<bool>()); // the caller's logits are not changed
    }

    [Fact]
    public void A_constraint_that_allows_no_token_marks_the_row_dead_instead_of_sampling_from_nothing()
    {
        // A vocabulary without the byte the grammar needs next: the mask is empty and the match is not complete.
        var vocab = new TokenVocabulary([[(byte)'a'], [(byte)'b']], 4);
        var grammar = ConstraintCompiler.Compile(StructuredOutputs.ForRegex("ac"));
        var seq = new Sequence("r", 0, [0], new SamplingParams { Temperature = 0 }, 0)
        {
            Constraint = new SequenceConstraint(new GrammarMatcher(grammar, vocab), [3], null),
        };
        Assert.True(seq.Constraint.Accept(0)); // "a"
        using var logits = ones(1, 4);
        using var masked = Sampler.ApplyConstraints(logits, [seq]);
        Assert.True(seq.Constraint.Dead);
    }

    [Fact]
    public void A_constraint_after_reasoning_starts_where_the_reasoning_ends()
    {
        var tokenizer = Text.Tokenization.ModelTokenizer.Load(Fixtures.Model("tiny-qwen3-chat"));
        var vocab = new TokenVocabulary(tokenizer, 151_936);
        var c = Constraint with { ReasoningEnd = "</think>" };
        var sc = new SequenceConstraint(new GrammarMatcher(ConstraintCompiler.Compile(c), vocab), [], c.ReasoningEnd);
        var ids = tokenizer.Encode("<think>\nNot JSON {{{ at all.\n</think>\n\n{\"mood\":\"sad\",\"age\":7,\"name\":\"Bo\"}", addSpecialTokens: false);
        bool sawActive = false;
        foreach (int id in ids)
        {
            Assert.True(sc.Accept(id), $"token {id} refused");
            sawActive |= sc.Active;
        }
        Assert.True(sawActive && sc.Matcher.IsTerminated);
        // Before the end of the reasoning anything goes; after it, the schema holds.
        var sc2 = new SequenceConstraint(new GrammarMatcher(ConstraintCompiler.Compile(c), vocab), [], c.ReasoningEnd);
        foreach (int id in tokenizer.Encode("<think>x</think>\n", addSpecialTokens: false)) Assert.True(sc2.Accept(id));
        Assert.False(sc2.Accept(tokenizer.Encode("[", addSpecialTokens: false)[0]));
    }
}
