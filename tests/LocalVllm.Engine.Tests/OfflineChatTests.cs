using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// The offline chat API (vLLM's <c>LLM.chat</c>) against Hugging Face transformers' own chat prompts and greedy
/// continuations of tiny-qwen3-chat (its real Qwen3 template and tokenizer).
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class OfflineChatTests
{
    private static readonly JsonArray Cases = Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray();

    private static ChatPromptOptions OptionsOf(JsonNode c) => new()
    {
        Tools = c["tools"]?.DeepClone().AsArray(),
        AddGenerationPrompt = c["add_generation_prompt"]!.GetValue<bool>(),
        ChatTemplateKwargs = new Dictionary<string, JsonNode?> { ["enable_thinking"] = c["enable_thinking"]!.GetValue<bool>() },
    };

    [Fact]
    public void Each_conversation_is_transformers_prompt_and_greedy_reply_alone_and_in_one_batch()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        foreach (var c in Cases)
        {
            var greedy = Fixtures.Ints(c!["greedy_ids"]);
            var output = Assert.Single(llm.Chat(c["messages"]!.DeepClone().AsArray(), EngineHarness.Greedy(greedy.Length), OptionsOf(c)));
            Assert.Equal(c["prompt_text"]!.GetValue<string>(), output.Prompt);
            Assert.Equal(Fixtures.Ints(c["prompt_ids"]), output.PromptTokenIds);
            Assert.Equal(greedy, output.Outputs[0].TokenIds);
        }

        // The cases without tools share their options: one call, one batch, the same prompts and replies in order.
        var plain = Cases.Where(c => c!["tools"] is null).ToArray();
        var batch = llm.Chat(plain.Select(c => c!["messages"]!.DeepClone().AsArray()).ToArray(), EngineHarness.Greedy(16), OptionsOf(plain[0]!));
        Assert.Equal(plain.Length, batch.Count);
        for (int i = 0; i < plain.Length; i++)
        {
            Assert.Equal(Fixtures.Ints(plain[i]!["prompt_ids"]), batch[i].PromptTokenIds);
            Assert.Equal(Fixtures.Ints(plain[i]!["greedy_ids"]), batch[i].Outputs[0].TokenIds);
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void A_continued_final_message_ends_the_prompt_at_its_text()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var messages = new JsonArray
        {
            new JsonObject { ["role"] = "user", ["content"] = "What is the capital of France?" },
            new JsonObject { ["role"] = "assistant", ["content"] = "The capital of France is" },
        };
        var (text, ids) = llm.Engine.RenderChatPrompt(messages, new ChatPromptOptions { ContinueFinalMessage = true });
        Assert.EndsWith("The capital of France is", text);
        var closed = llm.Engine.RenderChatPrompt(messages, new ChatPromptOptions { AddGenerationPrompt = false }).Text;
        Assert.StartsWith(text, closed);
        Assert.True(closed.Length > text.Length); // the template closes the message (<|im_end|>); continuing leaves it open
        Assert.Equal(llm.Engine.Tokenizer!.Encode(text, addSpecialTokens: false), ids);
        var reply = llm.Chat(messages, EngineHarness.Greedy(4), new ChatPromptOptions { ContinueFinalMessage = true })[0];
        Assert.Equal(ids, reply.PromptTokenIds);

        var both = Assert.Throws<ArgumentException>(() => llm.Chat(messages, null, new ChatPromptOptions { ContinueFinalMessage = true, AddGenerationPrompt = true }));
        Assert.Contains("ContinueFinalMessage", both.Message);
        var noRole = Assert.Throws<ArgumentException>(() => llm.Chat([new JsonObject { ["content"] = "hi" }]));
        Assert.Contains("Message 0", noRole.Message);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void A_model_without_a_chat_template_says_how_to_give_one()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var e = Assert.Throws<NotSupportedException>(() => llm.Chat([new JsonObject { ["role"] = "user", ["content"] = "hi" }]));
        Assert.Contains("EngineOptions.ChatTemplate", e.Message);
    }
}
