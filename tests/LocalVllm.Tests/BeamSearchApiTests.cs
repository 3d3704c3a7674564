using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Server;

namespace LocalVllm.Tests;

/// <summary>vLLM's <c>use_beam_search</c> on <c>/v1/completions</c>, against the offline <see cref="Llm.BeamSearch(IReadOnlyList{string}, BeamSearchParams, LoraRequest?)"/> of a separate engine.</summary>
[Trait("Category", "Fixtures")]
public sealed class BeamSearchApiTests
{
    private static async Task<(HttpStatusCode Status, JsonNode Json)> Post(HttpClient http, JsonObject body)
    {
        using var response = await http.PostAsync("v1/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, JsonNode.Parse(await response.Content.ReadAsStringAsync())!);
    }

    [Fact]
    public async Task Beam_search_completions_are_the_offline_searchs_beams_n_per_prompt_and_misuse_is_refused_by_field()
    {
        var c = Fixtures.Reference("stories260K")["cases"]![0]!;
        string[] prompts = [c["text"]!.GetValue<string>() + c["greedy_text"]!.GetValue<string>(), "The little dog"]; // a long prompt and a short one
        var p = new BeamSearchParams { BeamWidth = 3, MaxTokens = 8, IgnoreEos = true, LengthPenalty = 0.5 };
        IReadOnlyList<BeamSearchOutput> offline;
        using (var llm = new Llm(new EngineOptions { Model = Fixtures.Model("stories260K"), KvCacheMemoryBytes = 8L << 20 }))
            offline = llm.BeamSearch(prompts, p);

        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var body = new JsonObject
        {
            ["prompt"] = new JsonArray(prompts.Select(x => (JsonNode?)x).ToArray()), ["use_beam_search"] = true, ["n"] = 3, ["max_tokens"] = 8,
            ["temperature"] = 0, ["ignore_eos"] = true, ["length_penalty"] = 0.5,
        };
        var (status, json) = await Post(http, body);
        Assert.Equal(HttpStatusCode.OK, status);
        var choices = json["choices"]!.AsArray();
        Assert.Equal(6, choices.Count);
        for (int i = 0; i < prompts.Length; i++)
            for (int b = 0; b < 3; b++)
            {
                var choice = choices[i * 3 + b]!;
                Assert.Equal(i * 3 + b, choice["index"]!.GetValue<int>());
                Assert.Equal(offline[i].Sequences[b].Text, choice["text"]!.GetValue<string>());
                Assert.Equal("length", choice["finish_reason"]!.GetValue<string>());
            }
        var usage = json["usage"]!;
        Assert.Equal(offline.Sum(o => o.PromptTokenIds.Count), usage["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(6 * 8, usage["completion_tokens"]!.GetValue<int>());

        // The same search again: the story prompt's full blocks come from the prefix cache.
        (_, json) = await Post(http, body);
        Assert.Equal(offline[0].PromptTokenIds.Count / 16 * 16, json["usage"]!["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>());
        Assert.True(offline[0].PromptTokenIds.Count >= 16);

        foreach (var (field, value, param) in new (string, JsonNode, string)[]
                 {
                     ("stream", true, "stream"), ("logprobs", 2, "logprobs"), ("echo", true, "echo"),
                     ("n", 11, "n"), ("length_penalty", "steep", "length_penalty"),
                 })
        {
            var bad = (JsonObject)body.DeepClone();
            bad[field] = value;
            var (badStatus, error) = await Post(http, bad);
            Assert.Equal((HttpStatusCode.BadRequest, param), (badStatus, error["error"]!["param"]?.GetValue<string>()));
        }
        var (_, tooWide) = await Post(http, new JsonObject { ["prompt"] = "Hi", ["use_beam_search"] = true, ["n"] = 11 });
        Assert.Contains("--max-logprobs", tooWide["error"]!["message"]!.GetValue<string>());
        await server.Engine.Engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }

    [Fact]
    public async Task Beam_search_chat_completions_are_the_offline_searchs_beams_of_the_rendered_conversation()
    {
        var template = Path.Combine(Fixtures.Root, "tokenizers", "chat_templates", "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja");
        var messages = new JsonArray(new JsonObject { ["role"] = "system", ["content"] = "You tell stories." }, new JsonObject { ["role"] = "user", ["content"] = "Tell me about a dog." });
        var p = new BeamSearchParams { BeamWidth = 2, MaxTokens = 6, IgnoreEos = true };
        BeamSearchOutput offline;
        using (var llm = new Llm(new EngineOptions { Model = Fixtures.Model("stories260K"), KvCacheMemoryBytes = 8L << 20, ChatTemplate = template }))
            offline = llm.BeamSearch([llm.Engine.RenderChatPrompt((JsonArray)messages.DeepClone()).TokenIds], p)[0];

        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M", "--chat-template", template]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var body = new JsonObject { ["messages"] = messages.DeepClone(), ["use_beam_search"] = true, ["n"] = 2, ["max_tokens"] = 6, ["temperature"] = 0, ["ignore_eos"] = true };
        using var response = await http.PostAsync("v1/chat/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        var json = JsonNode.Parse(await response.Content.ReadAsStringAsync())!;
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal(offline.Sequences.Select(x => x.Text), json["choices"]!.AsArray().Select(c => c!["message"]!["content"]!.GetValue<string>()));
        Assert.Equal(offline.PromptTokenIds.Count, json["usage"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(12, json["usage"]!["completion_tokens"]!.GetValue<int>());
        foreach (var (field, value) in new (string, JsonNode)[] { ("stream", true), ("logprobs", true), ("tools", new JsonArray(new JsonObject { ["type"] = "function", ["function"] = new JsonObject { ["name"] = "f" } })) })
        {
            var bad = (JsonObject)body.DeepClone();
            bad[field] = value;
            using var refused = await http.PostAsync("v1/chat/completions", new StringContent(bad.ToJsonString(), Encoding.UTF8, "application/json"));
            var error = JsonNode.Parse(await refused.Content.ReadAsStringAsync())!;
            Assert.Equal((HttpStatusCode.BadRequest, field), (refused.StatusCode, error["error"]!["param"]?.GetValue<string>()));
        }
    }
}
