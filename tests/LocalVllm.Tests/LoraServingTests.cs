using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Server;
using LocalVllm.TestSupport;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.SemanticKernel;

namespace LocalVllm.Tests;

/// <summary>
/// LoRA adapters through the server (<c>--lora-modules</c>, a request's <c>model</c>), the in-process chat client
/// (<c>ChatOptions.ModelId</c>) and the remote-mode registration, each against the same adapter merged into a copy of
/// stories260K and run as a plain model.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class LoraServingTests : IDisposable
{
    private readonly LoraAdapters _adapters = new();
    private static readonly string Template = Path.Combine(Fixtures.Root, "tokenizers", "chat_templates", "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja");
    private const string Prompt = "Once upon a time, there was a little girl named Lily.";

    public void Dispose() => _adapters.Dispose();

    private static EngineOptions Options(string model) => new() { Model = model, KvCacheMemoryBytes = 8L << 20, ChatTemplate = Template };

    private static async Task<(HttpStatusCode Status, JsonNode Json)> Post(HttpClient http, string path, JsonObject body)
    {
        using var response = await http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, JsonNode.Parse(await response.Content.ReadAsStringAsync())!);
    }

    private static JsonArray Messages() => [new JsonObject { ["role"] = "user", ["content"] = "Tell me about a cat." }];

    [Fact]
    public async Task Adapters_named_as_the_model_give_their_merged_models_completions_and_chats_over_http_in_process_and_remote()
    {
        string style = _adapters.Adapter("stories260K", seed: 21), other = _adapters.Adapter("stories260K", seed: 22, modules: ["q_proj", "o_proj", "up_proj"]);
        // References: each adapter merged into the checkpoint, greedy, the same prompt and chat.
        var greedy = new SamplingParams { Temperature = 0, MaxTokens = 16, IgnoreEos = true };
        (string Completion, string Chat) Reference(string dir)
        {
            using var llm = new Llm(Options(dir));
            return (llm.Generate([Prompt], greedy)[0].Outputs[0].Text, llm.Chat(Messages(), greedy)[0].Outputs[0].Text);
        }
        var (baseRef, styleRef, otherRef) = (Reference(Fixtures.Model("stories260K")), Reference(_adapters.Merged("stories260K", style)), Reference(_adapters.Merged("stories260K", other)));
        Assert.NotEqual(baseRef.Completion, styleRef.Completion);

        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--served-model-name", "stories", "--port", "0",
            "--kv-cache-memory", "8M", "--chat-template", Template, "--enable-lora", "--lora-modules", $"style={style}", $$"""{"name": "other", "path": "{{other}}"}""",
            "--max-loras", "2"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };

        var models = JsonNode.Parse(await http.GetStringAsync("v1/models"))!["data"]!.AsArray();
        Assert.Equal(["stories", "style", "other"], models.Select(m => m!["id"]!.GetValue<string>()));
        Assert.Equal(("stories", style), (models[1]!["parent"]!.GetValue<string>(), models[1]!["root"]!.GetValue<string>()));

        foreach (var (model, expected) in new[] { ("stories", baseRef), ("style", styleRef), ("other", otherRef) })
        {
            var completion = new JsonObject { ["model"] = model, ["prompt"] = Prompt, ["temperature"] = 0, ["max_tokens"] = 16, ["ignore_eos"] = true };
            var (status, json) = await Post(http, "v1/completions", completion);
            Assert.Equal(HttpStatusCode.OK, status);
            Assert.Equal((model, expected.Completion), (json["model"]!.GetValue<string>(), json["choices"]![0]!["text"]!.GetValue<string>()));
            completion["stream"] = true;
            using var streamed = await http.PostAsync("v1/completions", new StringContent(completion.ToJsonString(), Encoding.UTF8, "application/json"));
            var events = (await streamed.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)[..^1].Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();
            Assert.Equal(expected.Completion, string.Concat(events.Select(e => e["choices"]![0]!["text"]!.GetValue<string>())));
            Assert.All(events, e => Assert.Equal(model, e["model"]!.GetValue<string>()));

            (status, json) = await Post(http, "v1/chat/completions", new JsonObject { ["model"] = model, ["messages"] = Messages(), ["temperature"] = 0, ["max_tokens"] = 16, ["ignore_eos"] = true });
            Assert.Equal(HttpStatusCode.OK, status);
            Assert.Equal((model, expected.Chat), (json["model"]!.GetValue<string>(), json["choices"]![0]!["message"]!["content"]!.GetValue<string>()));
        }

        // The remote-mode registration pointed at the server, naming the adapter as its model.
        var services = new ServiceCollection();
        services.AddLocalVllm(o => { o.Endpoint = new Uri(server.BaseAddress, "v1"); o.Model = "style"; });
        await using (var provider = services.BuildServiceProvider())
        {
            var remote = await provider.GetRequiredService<IChatClient>().GetResponseAsync([new ChatMessage(ChatRole.User, "Tell me about a cat.")],
                new ChatOptions { Temperature = 0, MaxOutputTokens = 16, AdditionalProperties = new() { ["ignore_eos"] = true } });
            Assert.Equal(styleRef.Chat, remote.Text);
        }

        // vLLM's lora_requests_info while a request runs under an adapter: its name among the running adapters.
        var longRun = new JsonObject { ["model"] = "other", ["prompt"] = Prompt, ["max_tokens"] = 400, ["ignore_eos"] = true, ["stream"] = true };
        using (var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions") { Content = new StringContent(longRun.ToJsonString(), Encoding.UTF8, "application/json") })
        using (var running = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead))
        {
            await using var body = await running.Content.ReadAsStreamAsync();
            Assert.True(await body.ReadAsync(new byte[64]) > 0); // the stream has begun: the request is running
            var metrics = (await http.GetStringAsync("metrics")).Split('\n');
            Assert.True(metrics.Any(l => l.StartsWith("vllm:lora_requests_info{", StringComparison.Ordinal) && l.Contains("max_lora=\"2\"") && l.Contains("running_lora_adapters=\"other\"")),
                string.Join("\n", metrics.Where(l => l.Contains("lora"))));
        }

        var (missing, error) = await Post(http, "v1/completions", new JsonObject { ["model"] = "nope", ["prompt"] = Prompt });
        Assert.Equal(HttpStatusCode.NotFound, missing);
        Assert.Contains("'style', 'other'", error["error"]!["message"]!.GetValue<string>());
        var (embed, embedError) = await Post(http, "v1/embeddings", new JsonObject { ["model"] = "style", ["input"] = Prompt });
        Assert.Equal((HttpStatusCode.BadRequest, "model"), (embed, embedError["error"]!["param"]!.GetValue<string>()));
        await server.Engine.Engine.WhenIdleAsync(); // the long request's client went away: its abort has been applied
        await server.Engine.Engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }

    [Fact]
    public async Task In_process_the_chat_client_runs_the_adapter_its_options_name_and_refuses_other_names()
    {
        string style = _adapters.Adapter("stories260K", seed: 23);
        var greedy = new SamplingParams { Temperature = 0, MaxTokens = 12, IgnoreEos = true };
        string expected;
        using (var merged = new Llm(Options(_adapters.Merged("stories260K", style)))) expected = merged.Chat(Messages(), greedy)[0].Outputs[0].Text;

        var services = new ServiceCollection();
        services.AddLocalVllm(o =>
        {
            o.Model = Fixtures.Model("stories260K");
            o.ModelId = "stories";
            o.Engine.KvCacheMemoryBytes = 8L << 20;
            o.Engine.ChatTemplate = Template;
            o.LoraModules.Add(new LoraRequest("style", 1, style)); // turns LoRA on by itself
        });
        await using var provider = services.BuildServiceProvider();
        var client = provider.GetRequiredService<IChatClient>();
        var options = new ChatOptions { ModelId = "style", Temperature = 0, MaxOutputTokens = 12, AdditionalProperties = new() { ["ignore_eos"] = true } };
        var response = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Tell me about a cat.")], options);
        Assert.Equal((expected, "style"), (response.Text, response.ModelId));
        var streamed = new StringBuilder();
        await foreach (var update in client.GetStreamingResponseAsync([new ChatMessage(ChatRole.User, "Tell me about a cat.")], options))
        {
            streamed.Append(update.Text);
            Assert.Equal("style", update.ModelId);
        }
        Assert.Equal(expected, streamed.ToString());

        var plain = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Tell me about a cat.")], new ChatOptions
        {
            ModelId = "stories", Temperature = 0, MaxOutputTokens = 12, AdditionalProperties = new() { ["ignore_eos"] = true },
        });
        Assert.NotEqual(expected, plain.Text); // the base model answers otherwise
        Assert.Equal("stories", plain.ModelId);

        options.ModelId = "unknown";
        var e = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")], options));
        Assert.Contains("or a LoRA adapter ('style')", e.Message);
    }

    /// <summary>
    /// With VLLM_ALLOW_RUNTIME_LORA_UPDATING, adapters come and go while the server runs: a loaded one is listed and
    /// serves its merged model's completion, a bad one is a 400 naming the problem, an unloaded one is a 404 again.
    /// Without the variable the two endpoints do not exist.
    /// </summary>
    [Fact]
    public async Task Adapters_load_and_unload_at_run_time_when_the_environment_allows_it()
    {
        string style = _adapters.Adapter("stories260K", seed: 25);
        string expected;
        using (var merged = new Llm(Options(_adapters.Merged("stories260K", style))))
            expected = merged.Generate([Prompt], new SamplingParams { Temperature = 0, MaxTokens = 10, IgnoreEos = true })[0].Outputs[0].Text;
        string[] args = ["--model", Fixtures.Model("stories260K"), "--served-model-name", "stories", "--port", "0", "--kv-cache-memory", "8M", "--enable-lora"];

        await using (var locked = LocalVllmServer.Create(ServerOptions.Parse(args, _ => null)))
        {
            await locked.StartAsync();
            using var http0 = new HttpClient { BaseAddress = locked.BaseAddress };
            var (status0, _) = await PostText(http0, "v1/load_lora_adapter", new JsonObject { ["lora_name"] = "style", ["lora_path"] = style });
            Assert.Equal(HttpStatusCode.NotFound, status0);
        }

        await using var server = LocalVllmServer.Create(ServerOptions.Parse(args, name => name == "VLLM_ALLOW_RUNTIME_LORA_UPDATING" ? "True" : null));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var completion = new JsonObject { ["model"] = "style", ["prompt"] = Prompt, ["temperature"] = 0, ["max_tokens"] = 10, ["ignore_eos"] = true };
        Assert.Equal(HttpStatusCode.NotFound, (await Post(http, "v1/completions", completion)).Status);

        var (loaded, message) = await PostText(http, "v1/load_lora_adapter", new JsonObject { ["lora_name"] = "style", ["lora_path"] = style });
        Assert.Equal(HttpStatusCode.OK, loaded);
        Assert.Contains("'style' added", message);
        Assert.Contains("style", await http.GetStringAsync("v1/models"));
        var (ok, json) = await Post(http, "v1/completions", completion);
        Assert.Equal((HttpStatusCode.OK, expected), (ok, json["choices"]![0]!["text"]!.GetValue<string>()));

        var (again, againText) = await PostText(http, "v1/load_lora_adapter", new JsonObject { ["lora_name"] = "style", ["lora_path"] = style });
        Assert.Equal(HttpStatusCode.BadRequest, again);
        Assert.Contains("already loaded", againText);
        var (wide, wideText) = await PostText(http, "v1/load_lora_adapter", new JsonObject { ["lora_name"] = "wide", ["lora_path"] = _adapters.Adapter("stories260K", seed: 26, rank: 32) });
        Assert.Equal(HttpStatusCode.BadRequest, wide);
        Assert.Contains("MaxLoraRank", wideText);
        Assert.DoesNotContain("wide", await http.GetStringAsync("v1/models"));

        Assert.Equal(HttpStatusCode.OK, (await PostText(http, "v1/unload_lora_adapter", new JsonObject { ["lora_name"] = "style" })).Status);
        Assert.Equal(HttpStatusCode.NotFound, (await Post(http, "v1/completions", completion)).Status);
        Assert.Equal(HttpStatusCode.NotFound, (await PostText(http, "v1/unload_lora_adapter", new JsonObject { ["lora_name"] = "style" })).Status);
        await server.Engine.Engine.InvokeAsync(e => Assert.Empty(e.ListLoras()));
    }

    private static async Task<(HttpStatusCode Status, string Text)> PostText(HttpClient http, string path, JsonObject body)
    {
        using var response = await http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, await response.Content.ReadAsStringAsync());
    }

    /// <summary>A Semantic Kernel prompt whose execution settings name the adapter as the model runs under it.</summary>
    [Fact]
    public async Task A_semantic_kernel_prompt_picks_the_adapter_by_model_id()
    {
        string style = _adapters.Adapter("stories260K", seed: 27);
        string expected;
        using (var merged = new Llm(Options(_adapters.Merged("stories260K", style))))
            expected = merged.Chat(Messages(), new SamplingParams { Temperature = 0, MaxTokens = 12, IgnoreEos = true })[0].Outputs[0].Text;

        var builder = Microsoft.SemanticKernel.Kernel.CreateBuilder();
        builder.AddLocalVllmChatCompletion(o =>
        {
            o.Model = Fixtures.Model("stories260K");
            o.Engine.KvCacheMemoryBytes = 8L << 20;
            o.Engine.ChatTemplate = Template;
            o.LoraModules.Add(new LoraRequest("style", 1, style));
        });
        var kernel = builder.Build();
        var settings = new Microsoft.SemanticKernel.PromptExecutionSettings
        {
            ModelId = "style",
            ExtensionData = new Dictionary<string, object> { ["temperature"] = 0, ["max_tokens"] = 12, ["ignore_eos"] = true },
        };
        var result = await kernel.InvokePromptAsync("Tell me about a cat.", new Microsoft.SemanticKernel.KernelArguments(settings));
        Assert.Equal(expected, result.GetValue<string>());
    }

    [Fact]
    public void A_bad_adapter_fails_the_server_at_start_up_by_name()
    {
        var wrongRank = _adapters.Adapter("stories260K", seed: 24, rank: 32);
        var e = Assert.ThrowsAny<Exception>(() => LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
            "--enable-lora", "--lora-modules", $"wide={wrongRank}"])));
        Assert.Contains("MaxLoraRank 16 (--max-lora-rank)", e.Message);
        Assert.Contains("is not name=path", Assert.Throws<ArgumentException>(() => ServerOptions.Parse(["--model", "m", "--lora-modules", "justaname"])).Message);
    }
}
