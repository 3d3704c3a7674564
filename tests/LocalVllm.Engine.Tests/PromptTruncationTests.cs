namespace LocalVllm.Engine.Tests;

/// <summary>vLLM's <c>truncate_prompt_tokens</c>: a left-truncated prompt runs as its last tokens alone would.</summary>
public sealed class PromptTruncationTests
{
    [Fact]
    public void A_truncated_prompt_generates_as_its_last_tokens_alone_and_minus_one_fits_a_prompt_longer_than_the_context()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var c = Fixtures.Reference("stories260K")["cases"]!.AsArray().First(x => x!["name"]!.GetValue<string>() == "long_100")!;
        var ids = Fixtures.Ints(c["prompt_ids"]);
        var tail = ids[^20..];
        var alone = llm.Generate([tail], EngineHarness.Greedy(12))[0];
        var truncated = llm.Generate([ids], EngineHarness.Greedy(12) with { TruncatePromptTokens = 20 })[0];
        Assert.Equal(tail, truncated.PromptTokenIds);
        Assert.Equal(alone.Outputs[0].TokenIds, truncated.Outputs[0].TokenIds);
        Assert.Equal(ids, llm.Generate([ids], EngineHarness.Greedy(4) with { TruncatePromptTokens = ids.Length + 5 })[0].PromptTokenIds);

        // Longer than the context: refused as it is, run on what fits before MaxTokens with -1.
        int context = llm.Engine.MaxModelLen;
        var huge = Enumerable.Repeat(ids[1..], context / (ids.Length - 1) + 2).SelectMany(x => x).Take(context + 50).ToArray();
        Assert.Contains("context length", Assert.Throws<ArgumentException>(() => llm.Generate([huge], EngineHarness.Greedy(8))).Message);
        var fitted = llm.Generate([huge], EngineHarness.Greedy(8) with { TruncatePromptTokens = -1 })[0];
        Assert.Equal(huge[^(context - 8)..], fitted.PromptTokenIds);
        Assert.Equal(8, fitted.Outputs[0].TokenIds.Count);

        Assert.Contains("TruncatePromptTokens", Assert.Throws<ArgumentOutOfRangeException>(() =>
            llm.Generate([ids], EngineHarness.Greedy(2) with { TruncatePromptTokens = 0 })).Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }
}
