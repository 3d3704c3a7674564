using System.Text;
using Json.Schema;
using LocalVllm.Engine.Structured;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Structured-output jump-forward: the bytes a grammar forces, the canonical tokens appended for them, and the engine
/// appending them without sampling (fewer steps, the same guarantees) on the real Qwen3 tokenizer.
/// </summary>
public sealed class JumpForwardTests
{
    // Long fixed key names, in schema order (StrictJson): most of the object's bytes are forced.
    private const string Schema = """
        {"type": "object", "properties": {
            "temperature_celsius": {"type": "integer", "minimum": -50, "maximum": 50},
            "weather_condition": {"enum": ["sunny", "cloudy", "raining"]},
            "is_windy": {"type": "boolean"}},
         "required": ["temperature_celsius", "weather_condition", "is_windy"], "additionalProperties": false}
        """;

    private static void AssertValid(string text)
    {
        var result = JsonSchema.FromText(Schema).Evaluate(System.Text.Json.JsonDocument.Parse(text).RootElement);
        Assert.True(result.IsValid, $"not valid under the schema: {text}");
    }

    [Fact]
    public void Forced_bytes_run_until_the_grammar_offers_a_choice()
    {
        var vocab = new TokenVocabulary(Enumerable.Range(0, 256).Select(b => new[] { (byte)b }).ToArray(), 257);
        var regex = new GrammarMatcher(ConstraintCompiler.Compile(StructuredOutputs.ForRegex("hello world [0-9]+!")), vocab);
        Assert.Equal("hello world ", Encoding.ASCII.GetString(regex.ForcedBytes(100)));
        Assert.Equal("hello", Encoding.ASCII.GetString(regex.ForcedBytes(5))); // at most max
        Assert.True(regex.TryAdvance("hello world 4"u8));
        Assert.Empty(regex.ForcedBytes(100)); // another digit or '!'
        Assert.True(regex.TryAdvance("2!"u8));
        Assert.Empty(regex.ForcedBytes(100)); // complete: ending is the other choice

        var json = new GrammarMatcher(ConstraintCompiler.Compile(StructuredOutputs.ForJsonSchema(Schema)), vocab);
        Assert.Equal("{\"temperature_celsius\":", Encoding.ASCII.GetString(json.ForcedBytes(100)));
        Assert.True(json.TryAdvance("{\"temperature_celsius\":1"u8));
        Assert.Empty(json.ForcedBytes(100)); // another digit or the comma
        Assert.True(json.TryAdvance("2"u8));
        // 12 is as long as the number can get (at most 50): the comma and the next key are forced.
        Assert.Equal(",\"weather_condition\":\"", Encoding.ASCII.GetString(json.ForcedBytes(100)));
        Assert.True(json.TryAdvance(","u8));
        Assert.True(json.TryAdvance("\"weather_condition\":\"r"u8));
        Assert.Equal("aining\",\"is_windy\":", Encoding.ASCII.GetString(json.ForcedBytes(100)));
    }

    /// <summary>
    /// The appended tokens are the tokenizer's own encoding: the last sampled token followed by the forced tokens
    /// encodes back to exactly those ids, and they spell the start of the forced bytes.
    /// </summary>
    [Fact]
    public void Forced_tokens_are_canonical_for_the_real_qwen3_tokenizer()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var tokenizer = llm.Engine.Tokenizer!;
        var vocab = llm.Engine.Vocabulary!;
        var constraint = new SequenceConstraint(new GrammarMatcher(ConstraintCompiler.Compile(StructuredOutputs.ForJsonSchema(Schema)), vocab), [151645], null);
        // Qwen3's vocabulary has a token for `{"` (what a model writes first): encoding `{"` with the forced key keeps it.
        int open = tokenizer.Encode("{\"", addSpecialTokens: false).Single();
        Assert.True(constraint.Accept(open));
        var forced = constraint.ForcedTokens(open, t => tokenizer.Encode(t, addSpecialTokens: false));
        Assert.NotEmpty(forced);
        Assert.Equal([open, .. forced], tokenizer.Encode(tokenizer.Decode([open, .. forced]), addSpecialTokens: false));
        string spelled = tokenizer.Decode(forced);
        Assert.StartsWith(spelled, "temperature_celsius\":", StringComparison.Ordinal);
        Assert.True(spelled.Length >= 10, spelled);
        // The matcher is not moved by asking.
        Assert.Equal(forced, constraint.ForcedTokens(open, t => tokenizer.Encode(t, addSpecialTokens: false)));
    }

    [Fact]
    public void The_engine_appends_forced_tokens_without_sampling_them_and_outputs_stay_valid()
    {
        var prompt = "<|im_start|>user\nThe weather?<|im_end|>\n<|im_start|>assistant\n";
        var results = new Dictionary<bool, (string Text, int Tokens, long Steps, long Jumped)>();
        foreach (bool jump in new[] { true, false })
        {
            using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat", o => o.EnableJumpForward = jump));
            var engine = llm.Engine;
            long stepsBefore = engine.Counters.Steps;
            var o = llm.Generate([engine.EncodePrompt(prompt)], new SamplingParams
            {
                Temperature = 0, MaxTokens = 80, StructuredOutputs = StructuredOutputs.ForJsonSchema(Schema),
            })[0].Outputs[0];
            Assert.Equal(FinishReasons.Stop, o.FinishReason);
            AssertValid(o.Text);
            results[jump] = (o.Text, o.TokenIds.Count, engine.Counters.Steps - stepsBefore, engine.Counters.JumpForwardTokens);
            EngineHarness.AssertNoLeaks(engine);
        }
        var (_, tokens, steps, jumped) = results[true];
        Assert.Equal(0, results[false].Jumped);
        Assert.True(jumped >= 10, $"{jumped} tokens jumped");
        // One step per sampled token (plus the prompt's); the forced ones ride along in those steps.
        Assert.True(steps <= tokens - jumped + 1, $"{steps} steps for {tokens} tokens with {jumped} jumped");
        Assert.True(results[false].Steps >= results[false].Tokens, $"without: {results[false].Steps} steps, {results[false].Tokens} tokens");
    }

    [Fact]
    public void Batched_jump_forward_gives_each_request_its_result_alone_and_respects_logprobs_and_max_tokens()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var engine = llm.Engine;
        var c = StructuredOutputs.ForJsonSchema(Schema);
        var prompts = new[] { "Weather in Oslo?", "Weather in Rome?", "Is it windy?" }
            .Select(q => (IReadOnlyList<int>)engine.EncodePrompt($"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")).ToList();
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = 80, StructuredOutputs = c };
        var alone = prompts.Select(p => llm.Generate([p], sampling)[0].Outputs[0].TokenIds.ToArray()).ToList();
        // Together, and beside an unconstrained request in the same steps.
        var ids = prompts.Select(p => engine.AddRequest(p, sampling)).ToList();
        engine.AddRequest(prompts[0], new SamplingParams { Temperature = 0, MaxTokens = 20 });
        var finished = new Dictionary<string, IReadOnlyList<int>>();
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step().Where(o => o.Finished))
                finished[o.RequestId] = o.Outputs[0].TokenIds;
        for (int i = 0; i < prompts.Count; i++) Assert.Equal(alone[i], finished[ids[i]]);

        // Log-probabilities asked for: every token sampled (none forced), one distribution per token.
        long before = engine.Counters.JumpForwardTokens;
        var withLogprobs = llm.Generate([prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 80, StructuredOutputs = c, Logprobs = 2 })[0].Outputs[0];
        Assert.Equal(before, engine.Counters.JumpForwardTokens);
        Assert.Equal(withLogprobs.TokenIds.Count, withLogprobs.Logprobs!.Count);
        AssertValid(withLogprobs.Text);

        // MaxTokens inside a forced run: exactly MaxTokens tokens, finished by length.
        var cut = llm.Generate([prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 3, StructuredOutputs = c })[0].Outputs[0];
        Assert.Equal(3, cut.TokenIds.Count);
        Assert.Equal(FinishReasons.Length, cut.FinishReason);
        EngineHarness.AssertNoLeaks(engine);
    }
}
