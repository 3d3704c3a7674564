using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Server;

namespace LocalVllm.Tests;

/// <summary>vLLM's <c>cache_salt</c> field over HTTP: completions and chat completions share cached blocks only under the same salt.</summary>
[Trait("Category", "Fixtures")]
public sealed class CacheSaltApiTests
{
    [Fact]
    public async Task Completions_and_chats_share_cached_prompt_blocks_only_under_the_same_salt()
    {
        var template = Path.Combine(Fixtures.Root, "tokenizers", "chat_templates", "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja");
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
            "--chat-template", template]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var story = Fixtures.Reference("stories260K")["cases"]![0]!;
        string prompt = story["text"]!.GetValue<string>() + story["greedy_text"]!.GetValue<string>(); // many full blocks

        async Task<(int Cached, string Text)> Post(string path, string? salt)
        {
            var body = path.Contains("chat")
                ? new JsonObject { ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = prompt }) }
                : new JsonObject { ["prompt"] = prompt };
            body["temperature"] = 0;
            body["max_tokens"] = 6;
            if (salt is not null) body["cache_salt"] = salt;
            using var response = await http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
            var json = JsonNode.Parse(await response.Content.ReadAsStringAsync())!;
            Assert.True(response.IsSuccessStatusCode, json.ToJsonString());
            var choice = json["choices"]![0]!;
            return (json["usage"]!["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>(), (choice["text"] ?? choice["message"]!["content"])!.GetValue<string>());
        }

        foreach (var path in new[] { "v1/completions", "v1/chat/completions" })
        {
            var first = await Post(path, "tenant-a");
            Assert.Equal(0, first.Cached);
            var again = await Post(path, "tenant-a");
            Assert.True(again.Cached > 0, $"{path}: the same salt found nothing cached");
            Assert.Equal(first.Text, again.Text);
            Assert.Equal((0, first.Text), await Post(path, "tenant-b"));
            Assert.Equal((0, first.Text), await Post(path, null));
        }

        using var bad = await http.PostAsync("v1/completions", new StringContent("""{"prompt": "x", "cache_salt": 5}""", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
        Assert.Contains("cache_salt", await bad.Content.ReadAsStringAsync());
        using var empty = await http.PostAsync("v1/chat/completions", new StringContent("""{"messages": [{"role": "user", "content": "x"}], "cache_salt": ""}""", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, empty.StatusCode);
        Assert.Contains("cache_salt", await empty.Content.ReadAsStringAsync());
    }
}
