using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Server;

namespace LocalVllm.Tests;

/// <summary>vLLM's /v1/score and /v1/rerank over embeddings: each score the cosine of the two texts' engine embeddings, computed here.</summary>
[Trait("Category", "Fixtures")]
public sealed class ScoreApiTests
{
    private static readonly string[] Passages = ["A cat sat on the mat.", "The rocket flew to the moon.", "Lily liked her little dog.", "The cat was sleeping."];

    private static async Task<(HttpStatusCode Status, JsonNode Json)> Post(HttpClient http, string path, JsonObject body)
    {
        using var response = await http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, JsonNode.Parse(await response.Content.ReadAsStringAsync())!);
    }

    [Fact]
    public async Task Scores_and_rankings_are_the_cosines_of_the_engines_embeddings()
    {
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var core = server.Engine.Engine.Engine;
        async Task<float[]> Embed(string text) => (await server.Engine.Engine.EmbedAsync([core.EncodePrompt(text)]))[0];
        async Task<double> Expected(string a, string b)
        {
            var (x, y) = (await Embed(a), await Embed(b));
            double dot = 0, nx = 0, ny = 0;
            for (int i = 0; i < x.Length; i++) { dot += x[i] * (double)y[i]; nx += x[i] * (double)x[i]; ny += y[i] * (double)y[i]; }
            return dot / Math.Sqrt(nx * ny);
        }
        const string query = "Where did the cat sleep?";
        var expected = new double[Passages.Length];
        for (int i = 0; i < Passages.Length; i++) expected[i] = await Expected(query, Passages[i]);
        Assert.True(expected.Distinct().Count() == expected.Length); // distinct, so the ranking is defined

        // One text_1 against every text_2.
        var (status, json) = await Post(http, "v1/score", new JsonObject { ["text_1"] = query, ["text_2"] = new JsonArray(Passages.Select(p => (JsonNode?)p).ToArray()) });
        Assert.Equal(HttpStatusCode.OK, status);
        var data = json["data"]!.AsArray();
        Assert.Equal(Passages.Length, data.Count);
        for (int i = 0; i < Passages.Length; i++)
        {
            Assert.Equal(i, data[i]!["index"]!.GetValue<int>());
            Assert.Equal(expected[i], data[i]!["score"]!.GetValue<double>(), 1e-5);
        }
        Assert.Equal(Passages.Sum(p => core.EncodePrompt(p).Length) + core.EncodePrompt(query).Length, json["usage"]!["prompt_tokens"]!.GetValue<int>());

        // Pairwise, and a mismatch refused.
        (status, json) = await Post(http, "score", new JsonObject { ["text_1"] = new JsonArray(query, Passages[0]), ["text_2"] = new JsonArray(Passages[1], Passages[2]) });
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal(await Expected(query, Passages[1]), json["data"]![0]!["score"]!.GetValue<double>(), 1e-5);
        Assert.Equal(await Expected(Passages[0], Passages[2]), json["data"]![1]!["score"]!.GetValue<double>(), 1e-5);
        (status, json) = await Post(http, "v1/score", new JsonObject { ["text_1"] = new JsonArray(query, query), ["text_2"] = new JsonArray(Passages.Select(p => (JsonNode?)p).ToArray()) });
        Assert.Equal((HttpStatusCode.BadRequest, "text_1"), (status, json["error"]!["param"]!.GetValue<string>()));

        // Rerank: best first, top_n, with or without the documents; the same on every path vLLM serves it.
        var order = Enumerable.Range(0, Passages.Length).OrderByDescending(i => expected[i]).ToArray();
        foreach (var path in new[] { "v1/rerank", "rerank", "v2/rerank" })
        {
            (status, json) = await Post(http, path, new JsonObject { ["query"] = query, ["documents"] = new JsonArray(Passages.Select(p => (JsonNode?)p).ToArray()), ["top_n"] = 3 });
            Assert.Equal(HttpStatusCode.OK, status);
            var results = json["results"]!.AsArray();
            Assert.Equal(order.Take(3), results.Select(r => r!["index"]!.GetValue<int>()));
            Assert.All(results, r => Assert.Equal(Passages[r!["index"]!.GetValue<int>()], r["document"]!["text"]!.GetValue<string>()));
            Assert.Equal(expected[order[0]], results[0]!["relevance_score"]!.GetValue<double>(), 1e-5);
        }
        (status, json) = await Post(http, "v1/rerank", new JsonObject { ["query"] = query, ["documents"] = new JsonArray(Passages.Select(p => (JsonNode?)p).ToArray()), ["return_documents"] = false });
        Assert.Equal(Passages.Length, json["results"]!.AsArray().Count);
        Assert.All(json["results"]!.AsArray(), r => Assert.Null(r!["document"]));
        (status, json) = await Post(http, "v1/rerank", new JsonObject { ["query"] = query, ["documents"] = new JsonArray() });
        Assert.Equal((HttpStatusCode.BadRequest, "documents"), (status, json["error"]!["param"]!.GetValue<string>()));
        (status, json) = await Post(http, "v1/rerank", new JsonObject { ["query"] = query, ["documents"] = new JsonArray("x"), ["rank_fields"] = "y" });
        Assert.Equal((HttpStatusCode.BadRequest, "rank_fields"), (status, json["error"]!["param"]!.GetValue<string>()));
    }
}
