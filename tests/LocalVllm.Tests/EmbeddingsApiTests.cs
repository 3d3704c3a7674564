using System.ClientModel;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using OpenAI.Embeddings;

namespace LocalVllm.Tests;

/// <summary>
/// Embeddings over HTTP (<c>/v1/embeddings</c>), through the official OpenAI SDK, and through the provider's
/// <c>IEmbeddingGenerator</c> in-process and in remote mode: all the engine's own vectors.
/// </summary>
public sealed class EmbeddingsApiTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private static readonly string[] Texts = ["The capital of France is Paris.", "Name a colour."];

    private async Task<float[][]> EngineVectors(EmbeddingPooling pooling = EmbeddingPooling.Last, bool normalize = true)
    {
        var engine = fixture.Server.Engine.Engine;
        return await engine.EmbedAsync(Texts.Select(t => (IReadOnlyList<int>)engine.Engine.EncodePrompt(t)).ToList(), pooling, normalize);
    }

    private async Task<(HttpStatusCode, JsonObject)> Post(JsonObject body)
    {
        var response = await fixture.Http.PostAsync("v1/embeddings", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, (JsonObject)JsonNode.Parse(await response.Content.ReadAsStringAsync())!);
    }

    private static float[] Floats(JsonNode? node) => node!.AsArray().Select(x => x!.GetValue<float>()).ToArray();

    [Fact]
    public async Task Embeddings_over_http_are_the_engines_vectors_as_floats_base64_and_from_token_ids()
    {
        var expected = await EngineVectors();
        var (status, body) = await Post(new JsonObject { ["model"] = "tiny-qwen3-chat", ["input"] = new JsonArray(Texts.Select(t => (JsonNode?)t).ToArray()) });
        Assert.True(status == HttpStatusCode.OK, body.ToJsonString());
        Assert.Equal("list", body["object"]!.GetValue<string>());
        var data = body["data"]!.AsArray();
        Assert.Equal(2, data.Count);
        for (int i = 0; i < 2; i++)
        {
            Assert.Equal(i, data[i]!["index"]!.GetValue<int>());
            Assert.Equal(expected[i], Floats(data[i]!["embedding"]));
            Assert.Equal(1.0, Math.Sqrt(expected[i].Sum(x => (double)x * x)), 5);
        }
        var tokenizer = fixture.Server.Engine.Engine.Engine;
        Assert.Equal(Texts.Sum(t => tokenizer.EncodePrompt(t).Length), body["usage"]!["prompt_tokens"]!.GetValue<int>());

        var (_, base64) = await Post(new JsonObject { ["input"] = Texts[0], ["encoding_format"] = "base64" });
        var bytes = Convert.FromBase64String(base64["data"]![0]!["embedding"]!.GetValue<string>());
        Assert.Equal(expected[0], System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray());

        var ids = tokenizer.EncodePrompt(Texts[1]);
        var (_, fromIds) = await Post(new JsonObject { ["input"] = new JsonArray(ids.Select(t => (JsonNode?)t).ToArray()) });
        Assert.Equal(expected[1], Floats(fromIds["data"]![0]!["embedding"]));

        // truncate_prompt_tokens keeps the input's last k tokens, as the engine's rule for prompts does.
        var lastThree = (await fixture.Server.Engine.Engine.EmbedAsync([ids[^3..]]))[0];
        var (_, truncated) = await Post(new JsonObject { ["input"] = Texts[1], ["truncate_prompt_tokens"] = 3 });
        Assert.Equal(lastThree, Floats(truncated["data"]![0]!["embedding"]));
        Assert.Equal(3, truncated["usage"]!["prompt_tokens"]!.GetValue<int>());

        var mean = await EngineVectors(EmbeddingPooling.Mean, normalize: false);
        var (_, meanBody) = await Post(new JsonObject { ["input"] = Texts[0], ["pooling"] = "mean", ["normalize"] = false });
        Assert.Equal(mean[0], Floats(meanBody["data"]![0]!["embedding"]));
    }

    [Fact]
    public async Task The_OpenAI_SDK_and_the_provider_in_process_and_remote_get_the_same_vectors()
    {
        var expected = await EngineVectors();
        var sdk = new EmbeddingClient("tiny-qwen3-chat", new ApiKeyCredential(ServerFixture.ApiKey),
            new OpenAI.OpenAIClientOptions { Endpoint = new Uri(fixture.Server.BaseAddress, "v1") });
        OpenAIEmbeddingCollection fromSdk = await sdk.GenerateEmbeddingsAsync(Texts);
        for (int i = 0; i < 2; i++) Assert.Equal(expected[i], fromSdk[i].ToFloats().ToArray());

        // In process, over the server's own engine (the same weights).
        using var local = new LocalVllmEmbeddingGenerator(fixture.Server.Engine);
        var generated = await local.GenerateAsync(Texts);
        for (int i = 0; i < 2; i++) Assert.Equal(expected[i], generated[i].Vector.ToArray());
        Assert.Equal(fixture.Server.Engine.Engine.Engine.Model.Config.HiddenSize, local.GetService<EmbeddingGeneratorMetadata>()!.DefaultModelDimensions);
        Assert.Throws<NotSupportedException>(() => local.GenerateAsync(Texts, new Microsoft.Extensions.AI.EmbeddingGenerationOptions { Dimensions = 3 }).GetAwaiter().GetResult());

        // Remote mode, registered from configuration alone.
        var services = new ServiceCollection();
        services.AddLocalVllm(o => { o.Endpoint = new Uri(fixture.Server.BaseAddress, "v1"); o.Model = "tiny-qwen3-chat"; o.ApiKey = ServerFixture.ApiKey; });
        services.AddLocalVllmEmbeddingGenerator();
        await using var sp = services.BuildServiceProvider();
        var remote = sp.GetRequiredService<IEmbeddingGenerator<string, Embedding<float>>>();
        var fromRemote = await remote.GenerateAsync(Texts);
        for (int i = 0; i < 2; i++) Assert.Equal(expected[i], fromRemote[i].Vector.ToArray());
    }

    [Theory]
    [InlineData("""{"input": []}""", "input")]
    [InlineData("""{"input": "hi", "dimensions": 3}""", "dimensions")]
    [InlineData("""{"input": "hi", "encoding_format": "int8"}""", "encoding_format")]
    [InlineData("""{"input": "hi", "pooling": "cls"}""", "pooling")]
    [InlineData("""{"input": [1, 99999999]}""", "input")]
    public async Task Embedding_requests_the_server_cannot_serve_get_a_400_naming_the_field(string json, string param)
    {
        var (status, body) = await Post((JsonObject)JsonNode.Parse(json)!);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Equal(param, body["error"]!["param"]!.GetValue<string>());
    }
}
