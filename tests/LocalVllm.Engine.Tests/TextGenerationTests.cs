using System.Text;
using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Engine.Tests;

/// <summary>Text in, text out: prompts tokenized as the reference did, streamed text complete and equal to the final text.</summary>
[Trait("Category", "Fixtures")]
public sealed class TextGenerationTests
{
    [Fact]
    public void Stories260K_runs_end_to_end_from_text()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        foreach (var c in Fixtures.Reference("stories260K")["cases"]!.AsArray())
        {
            var greedy = Fixtures.Ints(c!["greedy_ids"]);
            var o = llm.Generate([c["text"]!.GetValue<string>()], EngineHarness.Greedy(greedy.Length))[0];
            Assert.Equal(Fixtures.Ints(c["prompt_ids"]), o.PromptTokenIds);
            Assert.Equal(greedy, o.Outputs[0].TokenIds);
            Assert.Equal(c["greedy_text"]!.GetValue<string>(), o.Outputs[0].Text);
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Qwen3_chat_prompt_text_runs_end_to_end()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var tok = llm.Engine.Tokenizer!;
        foreach (var c in Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray())
        {
            var greedy = Fixtures.Ints(c!["greedy_ids"]);
            var o = llm.Generate([c["prompt_text"]!.GetValue<string>()], EngineHarness.Greedy(greedy.Length))[0];
            Assert.Equal(Fixtures.Ints(c["prompt_ids"]), o.PromptTokenIds);
            Assert.Equal(greedy, o.Outputs[0].TokenIds);
            Assert.Equal(tok.Decode(greedy), o.Outputs[0].Text);
        }
    }

    public static TheoryData<string> TextModels => new(["stories260K", "tiny-qwen3-chat"]);

    [Theory]
    [MemberData(nameof(TextModels))]
    public void Streamed_pieces_concatenate_to_the_final_text_without_replacement_characters(string model)
    {
        using var llm = new Llm(EngineHarness.Options(model));
        var tok = llm.Engine.Tokenizer!;
        foreach (var c in Fixtures.Reference(model)["cases"]!.AsArray())
        {
            var prompt = Fixtures.Ints(c!["prompt_ids"]);
            var greedy = Fixtures.Ints(c["greedy_ids"]);
            var detok = new IncrementalDetokenizer(tok, prompt);
            var streamed = new StringBuilder();
            foreach (var id in greedy)
            {
                var piece = detok.Add(id);
                Assert.DoesNotContain('\uFFFD', piece);
                streamed.Append(piece);
            }
            streamed.Append(detok.Flush());
            var whole = tok.Decode(prompt.Concat(greedy));
            var promptText = tok.Decode(prompt);
            Assert.Equal(whole[promptText.Length..], streamed.ToString());
        }
    }

    [Fact]
    public void A_character_split_across_byte_tokens_is_held_until_complete()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var tok = llm.Engine.Tokenizer!;
        var text = "Hi 😀 é";
        var ids = tok.Encode(text, addSpecialTokens: false);
        Assert.True(ids.Length > 4); // the emoji falls back to four byte tokens
        var detok = new IncrementalDetokenizer(tok, [1]);
        var pieces = ids.Select(detok.Add).Append(detok.Flush()).ToArray();
        Assert.All(pieces, p => Assert.DoesNotContain('\uFFFD', p));
        Assert.Equal(text, string.Concat(pieces));
    }

    [Theory]
    [InlineData(" little girl")]      // spans two tokens
    [InlineData("a little girl")]     // spans three tokens
    [InlineData("girl named Li")]     // ends inside a token
    public void Stop_strings_spanning_tokens_end_generation_and_are_not_returned(string stop)
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var c = Fixtures.Reference("stories260K")["cases"]![0]!;
        var full = c["greedy_text"]!.GetValue<string>();
        int at = full.IndexOf(stop, StringComparison.Ordinal);
        Assert.True(at > 0);
        var o = llm.Generate([c["text"]!.GetValue<string>()], EngineHarness.Greedy(64) with { Stop = [stop] })[0].Outputs[0];
        Assert.Equal(full[..at], o.Text);
        Assert.Equal(FinishReasons.Stop, o.FinishReason);
        Assert.Equal(stop, o.StopReason);
        Assert.True(o.TokenIds.Count < 64);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Text_that_might_start_a_stop_string_is_held_back_then_released()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var tok = llm.Engine.Tokenizer!;
        var ids = tok.Encode("The cat sat on the mat", addSpecialTokens: false);
        var detok = new IncrementalDetokenizer(tok, [1], stop: ["the hat"]);
        var pieces = ids.Select(detok.Add).ToList();
        // "the" and " " could start "the hat": held back until "mat" decides it.
        Assert.DoesNotContain(pieces, p => p.EndsWith("the", StringComparison.Ordinal));
        pieces.Add(detok.Flush());
        Assert.Equal("The cat sat on the mat", string.Concat(pieces));
        Assert.Null(detok.MatchedStop);
    }
}
