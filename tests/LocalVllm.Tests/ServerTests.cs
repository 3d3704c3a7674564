using System.ClientModel;
using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Server;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using OpenAI;
using OpenAI.Chat;

namespace LocalVllm.Tests;

/// <summary>One real server (Kestrel on a free 127.0.0.1 port) on the tiny Qwen3 fixture, shared by the tests of a class.</summary>
public sealed class ServerFixture : IAsyncLifetime
{
    public const string ApiKey = "test-key";
    public LocalVllmServer Server { get; private set; } = null!;
    public HttpClient Http { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        var options = ServerOptions.Parse(["--model", Fixtures.Model("tiny-qwen3-chat"), "--port", "0", "--api-key", ApiKey, "--kv-cache-memory", "16M"]);
        Server = LocalVllmServer.Create(options);
        await Server.StartAsync();
        Http = new HttpClient { BaseAddress = Server.BaseAddress };
        Http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", ApiKey);
    }

    public async Task DisposeAsync()
    {
        Http.Dispose();
        await Server.DisposeAsync();
    }
}

/// <summary>The OpenAI-compatible server, driven over HTTP and with the official OpenAI .NET SDK.</summary>
public sealed class ServerTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    /// <summary>
    /// How long a wait on an engine event may take before the test fails naming it: a hang guard (a regression shows as
    /// a failure, not a stuck run), far above what the waits need; not a timing assertion.
    /// </summary>
    internal static readonly TimeSpan HangGuard = TimeSpan.FromMinutes(2);

    private static readonly JsonNode Case0 = Fixtures.Reference("tiny-qwen3-chat")["cases"]![0]!;

    private async Task<(HttpStatusCode Status, JsonObject Body, HttpResponseMessage Response)> Post(string path, JsonObject body, HttpClient? http = null)
    {
        var response = await (http ?? fixture.Http).PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        var text = await response.Content.ReadAsStringAsync();
        return (response.StatusCode, (JsonObject)JsonNode.Parse(text)!, response);
    }

    private static JsonObject GreedyChat(int maxTokens) => new()
    {
        ["model"] = "tiny-qwen3-chat",
        ["messages"] = Case0["messages"]!.DeepClone(),
        ["temperature"] = 0, ["max_tokens"] = maxTokens, ["ignore_eos"] = true,
        ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false },
    };

    [Fact]
    public async Task A_chat_completion_returns_the_reference_greedy_continuation_and_usage_with_cached_tokens()
    {
        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        var (status, body, _) = await Post("v1/chat/completions", GreedyChat(greedy.Length));
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal("chat.completion", body["object"]!.GetValue<string>());
        var choice = body["choices"]![0]!;
        Assert.Equal(tokenizer.Decode(greedy), choice["message"]!["content"]!.GetValue<string>());
        Assert.Equal("length", choice["finish_reason"]!.GetValue<string>());
        int promptTokens = Fixtures.Ints(Case0["prompt_ids"]).Length;
        Assert.Equal(promptTokens, body["usage"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(greedy.Length, body["usage"]!["completion_tokens"]!.GetValue<int>());

        var (_, again, _) = await Post("v1/chat/completions", GreedyChat(greedy.Length));
        Assert.Equal((promptTokens - 1) / 16 * 16, again["usage"]!["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>());
        Assert.Equal(choice["message"]!["content"]!.GetValue<string>(), again["choices"]![0]!["message"]!["content"]!.GetValue<string>());
    }

    [Fact]
    public async Task The_OpenAI_SDK_gets_the_same_text_streamed_and_not_and_usage_in_the_stream()
    {
        var client = new ChatClient("tiny-qwen3-chat", new ApiKeyCredential(ServerFixture.ApiKey),
            new OpenAIClientOptions { Endpoint = new Uri(fixture.Server.BaseAddress, "v1") });
        List<OpenAI.Chat.ChatMessage> messages = [new SystemChatMessage("Be brief."), new UserChatMessage("Name a colour.")];
        var options = new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = 10 };
        ChatCompletion whole = await client.CompleteChatAsync(messages, options);
        Assert.Equal("tiny-qwen3-chat", whole.Model);
        Assert.True(whole.Usage.OutputTokenCount is > 0 and <= 10);

        var streamed = new StringBuilder();
        ChatTokenUsage? usage = null;
        OpenAI.Chat.ChatFinishReason? finish = null;
        await foreach (var update in client.CompleteChatStreamingAsync(messages, options))
        {
            foreach (var part in update.ContentUpdate) streamed.Append(part.Text);
            usage ??= update.Usage;
            finish ??= update.FinishReason;
        }
        Assert.Equal(whole.Content.Count == 0 ? "" : whole.Content[0].Text, streamed.ToString());
        Assert.Equal(whole.FinishReason, finish);
        Assert.NotNull(usage);
        Assert.Equal(whole.Usage.InputTokenCount, usage!.InputTokenCount);
        Assert.Equal(whole.Usage.OutputTokenCount, usage.OutputTokenCount);
    }

    [Fact]
    public async Task Chat_chunks_carry_running_usage_with_continuous_usage_stats()
    {
        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var body = GreedyChat(greedy.Length);
        body["stream"] = true;
        body["stream_options"] = new JsonObject { ["include_usage"] = true, ["continuous_usage_stats"] = true };
        using var response = await fixture.Http.PostAsync("v1/chat/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        var chunks = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)
            .Where(e => e != "data: [DONE]").Select(e => JsonNode.Parse(e["data: ".Length..])!).Where(c => c["choices"]!.AsArray().Count > 0).ToList();
        int prompt = Fixtures.Ints(Case0["prompt_ids"]).Length;
        long previous = 0;
        foreach (var chunk in chunks)
        {
            var usage = chunk["usage"]!;
            Assert.Equal(prompt, usage["prompt_tokens"]!.GetValue<int>());
            long completion = usage["completion_tokens"]!.GetValue<long>();
            Assert.True(completion >= previous);
            previous = completion;
        }
        Assert.Equal(0, chunks[0]["usage"]!["completion_tokens"]!.GetValue<long>()); // the role chunk
        Assert.Equal(greedy.Length, previous);
    }

    [Fact]
    public async Task Completions_on_token_ids_return_the_reference_continuation_streamed_and_not()
    {
        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        var request = new JsonObject
        {
            ["model"] = "tiny-qwen3-chat", ["prompt"] = Case0["prompt_ids"]!.DeepClone(), ["temperature"] = 0, ["max_tokens"] = greedy.Length, ["ignore_eos"] = true,
        };
        var (status, body, _) = await Post("v1/completions", request);
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal(tokenizer.Decode(greedy), body["choices"]![0]!["text"]!.GetValue<string>());

        request["stream"] = true;
        request["stream_options"] = new JsonObject { ["include_usage"] = true };
        using var response = await fixture.Http.PostAsync("v1/completions", new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json"));
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType!.MediaType);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", events[^1]);
        var chunks = events[..^1].Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();
        Assert.Equal(tokenizer.Decode(greedy), string.Concat(chunks.SelectMany(c => c["choices"]!.AsArray()).Select(c => c!["text"]!.GetValue<string>())));
        Assert.Equal(greedy.Length, chunks[^1]["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    /// <summary>Several prompts with n completions each stream as vLLM streams them: every choice's text, finish and the usage equal the non-streamed response's.</summary>
    [Fact]
    public async Task Completions_of_several_prompts_with_n_each_stream_the_same_choices_as_without_streaming()
    {
        var cases = Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray();
        var request = new JsonObject
        {
            ["prompt"] = new JsonArray(cases[0]!["prompt_ids"]!.DeepClone(), cases[1]!["prompt_ids"]!.DeepClone()), ["n"] = 2, ["temperature"] = 0,
            ["max_tokens"] = 6, ["ignore_eos"] = true,
        };
        var (status, whole, _) = await Post("v1/completions", request);
        Assert.Equal(HttpStatusCode.OK, status);
        request["stream"] = true;
        request["stream_options"] = new JsonObject { ["include_usage"] = true };
        using var response = await fixture.Http.PostAsync("v1/completions", new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", events[^1]);
        var chunks = events[..^1].Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();
        var choices = chunks.SelectMany(c => c["choices"]!.AsArray()).ToList();
        Assert.Equal(4, whole["choices"]!.AsArray().Count);
        foreach (var expected in whole["choices"]!.AsArray())
        {
            int index = expected!["index"]!.GetValue<int>();
            var mine = choices.Where(c => c!["index"]!.GetValue<int>() == index).ToList();
            Assert.Equal(expected["text"]!.GetValue<string>(), string.Concat(mine.Select(c => c!["text"]!.GetValue<string>())));
            Assert.Equal(expected["finish_reason"]!.GetValue<string>(), mine[^1]!["finish_reason"]!.GetValue<string>());
        }
        Assert.Equal(whole["usage"]!["prompt_tokens"]!.GetValue<int>(), chunks[^1]["usage"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(24, chunks[^1]["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task Completion_outputs_already_waiting_go_out_as_one_event_with_the_same_text()
    {
        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var engine = fixture.Server.Engine.Engine;
        var tokenizer = engine.Engine.Tokenizer!;
        var sampling = new LocalVllm.Engine.SamplingParams
        {
            Temperature = 0, MaxTokens = greedy.Length, IgnoreEos = true, OutputKind = LocalVllm.Engine.RequestOutputKind.Delta,
        };
        await using var run = engine.GenerateAsync(Fixtures.Ints(Case0["prompt_ids"]), sampling).GetAsyncEnumerator();
        bool any = await run.MoveNextAsync().AsTask().WaitAsync(HangGuard);
        // The request runs to its end while nothing reads it: every later output waits in its stream, as behind a
        // connection slower than the engine.
        await engine.WhenIdleAsync().WaitAsync(HangGuard);

        var pipe = new System.IO.Pipelines.Pipe();
        var writer = new CompletionChunkWriter(pipe.Writer, "cmpl-test", 0, "tiny-qwen3-chat");
        int flushes = 0;
        var (last, generated) = await OpenAiEndpoints.WriteCompletionEvents(run, any, writer, _ => null, () => { flushes++; return Task.CompletedTask; });
        await pipe.Writer.CompleteAsync();
        string written = await new StreamReader(pipe.Reader.AsStream()).ReadToEndAsync();

        var events = written.Split("\n\n", StringSplitOptions.RemoveEmptyEntries).Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();
        var choice = Assert.Single(events)["choices"]![0]!;
        Assert.Equal(tokenizer.Decode(greedy), choice["text"]!.GetValue<string>());
        Assert.Equal("length", choice["finish_reason"]!.GetValue<string>());
        Assert.Equal(greedy.Length, generated);
        Assert.True(last!.Finished);
        Assert.Equal(0, flushes); // the outputs were all there: one write at the end, nothing flushed in between
    }

    [Fact]
    public async Task Chat_text_deltas_held_while_more_wait_go_out_as_one_event_per_run()
    {
        var pipe = new System.IO.Pipelines.Pipe();
        var pending = new PendingDeltas(new ChatChunkWriter(pipe.Writer, "chatcmpl-test", 0, "tiny-qwen3-chat"), 2);
        var logprobs = new JsonObject { ["content"] = new JsonArray() };
        var toolCalls = new JsonArray { new JsonObject { ["index"] = 0, ["id"] = "call_1" } };
        // Completion 0: reasoning in two pieces, content in three (the second with logprobs, which keep their own event),
        // a tool call; completion 1, interleaved: content in two pieces. Then a flush point, then more text.
        pending.Add(0, new("reasoning_content", "Let me ", null, null));
        pending.Add(1, new("content", "Hi", null, null));
        pending.Add(0, new("reasoning_content", "think.", null, null));
        pending.Add(0, new("content", "The ", null, null));
        pending.Add(1, new("content", " there", null, null));
        pending.Add(0, new("content", "answer", null, logprobs));
        pending.Add(0, new("content", " is", null, null));
        pending.Add(0, new("content", " 4", null, null));
        pending.Add(0, new(null, null, toolCalls, null));
        pending.WriteAll();
        pending.Add(1, new("content", "!", null, null));
        pending.Finish(1, "stop");
        pending.Finish(0, "tool_calls");
        await pipe.Writer.CompleteAsync();
        string written = await new StreamReader(pipe.Reader.AsStream()).ReadToEndAsync();

        var events = written.Split("\n\n", StringSplitOptions.RemoveEmptyEntries).Select(e => JsonNode.Parse(e["data: ".Length..])!["choices"]![0]!).ToList();
        string Describe(JsonNode c)
        {
            var d = c["delta"]!.AsObject();
            string what = string.Join(",", d.Select(p => p.Key == "tool_calls" ? "tool_calls" : $"{p.Key}={p.Value}"));
            return $"{c["index"]}:{what}{(c["logprobs"] is null ? "" : "+logprobs")}{(c["finish_reason"] is { } f ? "|" + f : "")}";
        }
        Assert.Equal(
            [
                "0:reasoning_content=Let me think.", "0:content=The ", "0:content=answer+logprobs", "0:content= is 4", "0:tool_calls",
                "1:content=Hi there", "1:content=!", "1:|stop", "0:|tool_calls",
            ],
            events.Select(Describe));
    }

    /// <summary>
    /// OpenAI's reasoning_effort switches the template's thinking ("none" off, any other effort on: the prompt is the
    /// one /tokenize renders with enable_thinking false or true); vLLM's stop_token_ids end a completion at that token.
    /// </summary>
    [Fact]
    public async Task Reasoning_effort_switches_thinking_stop_token_ids_end_a_completion_and_logit_bias_forces_a_token()
    {
        JsonArray Messages() => [new JsonObject { ["role"] = "user", ["content"] = "Hi" }];
        async Task<int> Rendered(bool thinking) => (await Post("tokenize", new JsonObject
        {
            ["messages"] = Messages(), ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = thinking },
        })).Body["count"]!.GetValue<int>();
        async Task<int> Prompt(string effort) => (await Post("v1/chat/completions", new JsonObject
        {
            ["messages"] = Messages(), ["max_tokens"] = 1, ["reasoning_effort"] = effort,
        })).Body["usage"]!["prompt_tokens"]!.GetValue<int>();
        int off = await Rendered(false), on = await Rendered(true);
        Assert.NotEqual(off, on);
        Assert.Equal(off, await Prompt("none"));
        Assert.Equal(on, await Prompt("high"));
        var (status, error, _) = await Post("v1/chat/completions", new JsonObject { ["messages"] = Messages(), ["reasoning_effort"] = "extreme" });
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Equal("reasoning_effort", error["error"]!["param"]!.GetValue<string>());

        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        var (_, stopped, _) = await Post("v1/completions", new JsonObject
        {
            ["prompt"] = Case0["prompt_ids"]!.DeepClone(), ["temperature"] = 0, ["max_tokens"] = greedy.Length, ["ignore_eos"] = true,
            ["stop_token_ids"] = new JsonArray(greedy[2]),
        });
        var choice = stopped["choices"]![0]!;
        Assert.Equal("stop", choice["finish_reason"]!.GetValue<string>());
        Assert.Equal(greedy[2], choice["stop_reason"]!.GetValue<int>());
        Assert.Equal(3, stopped["usage"]!["completion_tokens"]!.GetValue<int>());
        Assert.StartsWith(tokenizer.Decode(greedy[..2]), choice["text"]!.GetValue<string>());

        // logit_bias (OpenAI's shape: token ids as strings): +100 on a token forces it in a chat reply and a completion.
        int forced = Enumerable.Range(100, 1000).First(t => !greedy.Contains(t));
        var bias = new JsonObject { [forced.ToString(System.Globalization.CultureInfo.InvariantCulture)] = 100 };
        var (_, forcedChat, _) = await Post("v1/chat/completions", new JsonObject
        {
            ["messages"] = Messages(), ["max_tokens"] = 3, ["temperature"] = 0, ["ignore_eos"] = true, ["logit_bias"] = bias.DeepClone(),
            ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false },
        });
        Assert.Equal(tokenizer.Decode([forced, forced, forced]), forcedChat["choices"]![0]!["message"]!["content"]!.GetValue<string>());
        var (_, forcedCompletion, _) = await Post("v1/completions", new JsonObject
        {
            ["prompt"] = Case0["prompt_ids"]!.DeepClone(), ["temperature"] = 0, ["max_tokens"] = 3, ["ignore_eos"] = true, ["logit_bias"] = bias.DeepClone(),
        });
        Assert.Equal(tokenizer.Decode([forced, forced, forced]), forcedCompletion["choices"]![0]!["text"]!.GetValue<string>());
    }

    [Fact]
    public async Task Models_health_tokenize_and_detokenize_answer()
    {
        using var health = await fixture.Http.GetAsync("health");
        Assert.Equal(HttpStatusCode.OK, health.StatusCode);
        using var anonymous = new HttpClient { BaseAddress = fixture.Server.BaseAddress }; // probes need no key
        Assert.Equal(HttpStatusCode.OK, (await anonymous.GetAsync("ping")).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await anonymous.PostAsync("ping", null)).StatusCode);
        var version = JsonNode.Parse(await fixture.Http.GetStringAsync("version"))!["version"]!.GetValue<string>();
        Assert.Equal(typeof(LocalVllmServer).Assembly.GetName().Version!.ToString(3), version.Split('+', '-')[0]);
        var models = JsonNode.Parse(await fixture.Http.GetStringAsync("v1/models"))!;
        Assert.Equal("tiny-qwen3-chat", models["data"]![0]!["id"]!.GetValue<string>());
        Assert.Equal(fixture.Server.Engine.MaxModelLen, models["data"]![0]!["max_model_len"]!.GetValue<int>());

        var text = Case0["prompt_text"]!.GetValue<string>();
        var (_, tokens, _) = await Post("tokenize", new JsonObject { ["prompt"] = text, ["add_special_tokens"] = false });
        Assert.Equal(Fixtures.Ints(Case0["prompt_ids"]), tokens["tokens"]!.AsArray().Select(t => t!.GetValue<int>()));
        var (_, back, _) = await Post("detokenize", new JsonObject { ["tokens"] = tokens["tokens"]!.DeepClone() });
        Assert.Equal(text, back["prompt"]!.GetValue<string>());
        Assert.Null(tokens["token_strs"]);
        // vLLM's return_token_strs: each token as the model's vocab.json spells it (read here on its own).
        var (_, strs, _) = await Post("tokenize", new JsonObject { ["prompt"] = text, ["add_special_tokens"] = false, ["return_token_strs"] = true });
        var vocab = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Model("tiny-qwen3-chat"), "tokenizer.json")))!;
        var byId = vocab["model"]!["vocab"]!.AsObject().ToDictionary(kv => kv.Value!.GetValue<int>(), kv => kv.Key);
        foreach (var t in vocab["added_tokens"]!.AsArray()) byId[t!["id"]!.GetValue<int>()] = t["content"]!.GetValue<string>();
        Assert.Equal(Fixtures.Ints(Case0["prompt_ids"]).Select(id => byId[id]), strs["token_strs"]!.AsArray().Select(s => s!.GetValue<string>()));

        // The chat form renders the messages with the template: the fixture's prompt ids (made by transformers).
        var (_, chat, _) = await Post("tokenize", new JsonObject
        {
            ["messages"] = Case0["messages"]!.DeepClone(), ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false },
        });
        Assert.Equal(Fixtures.Ints(Case0["prompt_ids"]), chat["tokens"]!.AsArray().Select(t => t!.GetValue<int>()));
    }

    [Fact]
    public async Task Metrics_are_served_in_Prometheus_text_under_vllms_names()
    {
        var (status, _, _) = await Post("v1/completions", new JsonObject { ["prompt"] = "Hello", ["max_tokens"] = 3, ["ignore_eos"] = true });
        Assert.Equal(HttpStatusCode.OK, status);
        using var anonymous = new HttpClient { BaseAddress = fixture.Server.BaseAddress }; // no key needed, as in vLLM
        using var response = await anonymous.GetAsync("metrics");
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/plain", response.Content.Headers.ContentType!.MediaType);
        var text = await response.Content.ReadAsStringAsync();
        foreach (var series in new[] { "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                     "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket", "vllm:gpu_prefix_cache_hit_rate", "localvllm_kv_blocks_free",
                     "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total", "vllm:kv_cache_usage_perc",
                     "vllm:request_success_total", "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                     "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket" })
            Assert.Contains("\n" + series + "{", text);
        double Value(string prefix) => text.Split('\n').Where(l => l.StartsWith(prefix, StringComparison.Ordinal))
            .Sum(l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture));
        Assert.True(Value("vllm:generation_tokens_total{") >= 2);
        Assert.True(Value("vllm:request_generation_tokens_sum{") >= 3); // this request's 3, at least
        Assert.True(Value("vllm:request_success_total{") >= 1);
        Assert.Contains("finished_reason=\"length\"", text.Split('\n').First(l => l.StartsWith("vllm:request_success_total{", StringComparison.Ordinal) && l.Contains("length")));
        Assert.InRange(Value("vllm:kv_cache_usage_perc{"), 0, 1);
        // vLLM's bucket boundaries: the first time-to-first-token bucket is 1 ms.
        Assert.Contains("vllm:time_to_first_token_seconds_bucket{", text.Split('\n').First(l => l.Contains("le=\"0.001\"")));
    }

    [Fact]
    public async Task Errors_have_OpenAIs_shape_and_status()
    {
        using (var anonymous = new HttpClient { BaseAddress = fixture.Server.BaseAddress })
        {
            var (status, body, _) = await Post("v1/chat/completions", GreedyChat(4), anonymous);
            Assert.Equal(HttpStatusCode.Unauthorized, status);
            Assert.Equal("authentication_error", body["error"]!["type"]!.GetValue<string>());
        }
        var unknown = GreedyChat(4);
        unknown["frobnicate"] = 1;
        var (s1, b1, _) = await Post("v1/chat/completions", unknown);
        Assert.Equal(HttpStatusCode.BadRequest, s1);
        Assert.Equal("frobnicate", b1["error"]!["param"]!.GetValue<string>());
        // A field of the wrong type is a 400 naming it, on chat and completions alike.
        var wrongType = GreedyChat(4);
        wrongType["stream"] = "yes";
        var (typeStatus, typeError, _) = await Post("v1/chat/completions", wrongType);
        Assert.Equal((HttpStatusCode.BadRequest, "stream"), (typeStatus, typeError["error"]!["param"]!.GetValue<string>()));
        (typeStatus, typeError, _) = await Post("v1/completions", new JsonObject { ["model"] = "tiny-qwen3-chat", ["prompt"] = "Hi", ["ignore_eos"] = 1 });
        Assert.Equal((HttpStatusCode.BadRequest, "ignore_eos"), (typeStatus, typeError["error"]!["param"]!.GetValue<string>()));
        // OpenAI's bookkeeping fields that clients send along are accepted; a modality other than text is not.
        var bookkeeping = GreedyChat(4);
        bookkeeping["store"] = false;
        bookkeeping["metadata"] = new JsonObject { ["app"] = "tests" };
        bookkeeping["service_tier"] = "auto";
        bookkeeping["modalities"] = new JsonArray("text");
        Assert.Equal(HttpStatusCode.OK, (await Post("v1/chat/completions", bookkeeping)).Status);
        bookkeeping["modalities"] = new JsonArray("text", "audio");
        var (audioStatus, audioError, _) = await Post("v1/chat/completions", bookkeeping);
        Assert.Equal((HttpStatusCode.BadRequest, "modalities"), (audioStatus, audioError["error"]!["param"]!.GetValue<string>()));

        using var malformed = await fixture.Http.PostAsync("v1/chat/completions", new StringContent("{\"model\": ", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, malformed.StatusCode);
        Assert.Contains("not valid JSON", JsonNode.Parse(await malformed.Content.ReadAsStringAsync())!["error"]!["message"]!.GetValue<string>());

        var wrongModel = GreedyChat(4);
        wrongModel["model"] = "gpt-5";
        var (s2, b2, _) = await Post("v1/chat/completions", wrongModel);
        Assert.Equal(HttpStatusCode.NotFound, s2);
        Assert.Contains("gpt-5", b2["error"]!["message"]!.GetValue<string>());

        var tooLong = new JsonObject { ["prompt"] = new JsonArray(Enumerable.Repeat(1, fixture.Server.Engine.MaxModelLen + 1).Select(i => (JsonNode?)i).ToArray()), ["max_tokens"] = 1 };
        var (s3, b3, _) = await Post("v1/completions", tooLong);
        Assert.Equal(HttpStatusCode.BadRequest, s3);
        Assert.Contains(fixture.Server.Engine.MaxModelLen.ToString(System.Globalization.CultureInfo.InvariantCulture), b3["error"]!["message"]!.GetValue<string>());

        var (s4, b4, _) = await Post("v1/chat/completions", GreedyChat(fixture.Server.Engine.MaxModelLen + 10));
        Assert.Equal(HttpStatusCode.BadRequest, s4);
        Assert.Equal("max_tokens", b4["error"]!["param"]!.GetValue<string>());

        var sdk = new ChatClient("tiny-qwen3-chat", new ApiKeyCredential("wrong"), new OpenAIClientOptions { Endpoint = new Uri(fixture.Server.BaseAddress, "v1") });
        var e = await Assert.ThrowsAsync<ClientResultException>(() => sdk.CompleteChatAsync([new UserChatMessage("hi")]));
        Assert.Equal(401, e.Status);
    }

    [Fact]
    public async Task The_remote_mode_registration_talks_to_the_server_with_the_same_options_by_configuration_alone()
    {
        var endpoint = new Uri(fixture.Server.BaseAddress, "v1");
        var services = new ServiceCollection();
        services.AddLocalVllm(new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Endpoint"] = endpoint.ToString(), ["Model"] = "tiny-qwen3-chat", ["ApiKey"] = ServerFixture.ApiKey,
        }).Build());
        using var sp = services.BuildServiceProvider();
        var client = sp.GetRequiredService<IChatClient>();
        Assert.Equal(endpoint, client.GetService<ChatClientMetadata>()!.ProviderUri);

        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var messages = Case0["messages"]!.AsArray()
            .Select(m => new Microsoft.Extensions.AI.ChatMessage(new ChatRole(m!["role"]!.GetValue<string>()), m["content"]!.GetValue<string>())).ToList();
        var options = new ChatOptions { Temperature = 0, MaxOutputTokens = greedy.Length, AdditionalProperties = new() { ["enable_thinking"] = false, ["ignore_eos"] = true } };
        var response = await client.GetResponseAsync(messages, options);
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        Assert.Equal(tokenizer.Decode(greedy), response.Text); // the extra fields reached the server: thinking off, EOS ignored
        int promptTokens = Fixtures.Ints(Case0["prompt_ids"]).Length;
        Assert.Equal(promptTokens, response.Usage!.InputTokenCount);
        Assert.Equal(greedy.Length, response.Usage.OutputTokenCount);

        var streamed = new StringBuilder();
        await foreach (var u in client.GetStreamingResponseAsync(messages, options)) streamed.Append(u.Text);
        Assert.Equal(response.Text, streamed.ToString());
        var again = await client.GetResponseAsync(messages, options);
        Assert.Equal((promptTokens - 1) / 16 * 16, again.Usage!.CachedInputTokenCount);

        var unknown = new ChatOptions { AdditionalProperties = new() { ["topk"] = 3 } };
        await Assert.ThrowsAsync<NotSupportedException>(() => client.GetResponseAsync(messages, unknown));
    }

    [Fact]
    public async Task Two_hundred_concurrent_streams_with_a_third_disconnecting_leave_no_block_behind()
    {
        async Task<int> One(int i)
        {
            var request = new JsonObject
            {
                ["messages"] = new JsonArray { new JsonObject { ["role"] = "user", ["content"] = $"Request {i}: tell me something." } },
                ["max_tokens"] = i % 3 == 0 ? 500 : 6, ["ignore_eos"] = true, ["stream"] = true, ["temperature"] = 0,
            };
            using var message = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json") };
            using var response = await fixture.Http.SendAsync(message, HttpCompletionOption.ResponseHeadersRead);
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
            int events = 0;
            while (await reader.ReadLineAsync() is { } line)
            {
                if (!line.StartsWith("data: ", StringComparison.Ordinal)) continue;
                events++;
                if (i % 3 == 0 && events == 2) return -1; // this client goes away mid-stream
                if (line == "data: [DONE]") return events;
            }
            return events;
        }
        var results = await Task.WhenAll(Enumerable.Range(0, 200).Select(One));
        Assert.Equal(67, results.Count(r => r == -1));
        Assert.All(results.Where(r => r != -1), r => Assert.True(r >= 3, $"a finished stream had {r} events")); // role, tokens, finish, [DONE]

        // Idle means every disconnected client's request has been aborted (the engine has nothing unfinished).
        var engine = fixture.Server.Engine.Engine;
        await engine.WhenIdleAsync().WaitAsync(HangGuard);
        await engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }

    [Fact]
    public async Task A_client_that_disconnects_mid_stream_frees_its_blocks()
    {
        var request = GreedyChat(2000);
        request["stream"] = true;
        using (var message = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json") })
        using (var response = await fixture.Http.SendAsync(message, HttpCompletionOption.ResponseHeadersRead))
        {
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
            int events = 0;
            while (events < 3 && await reader.ReadLineAsync() is { } line)
                if (line.StartsWith("data: ", StringComparison.Ordinal)) events++;
            Assert.Equal(3, events);
        } // the connection goes: the server aborts the request

        // The 2,000-token request ends only by the abort the disconnect causes; idle means it has happened.
        var engine = fixture.Server.Engine.Engine;
        await engine.WhenIdleAsync().WaitAsync(HangGuard);
        await engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }

    private const string ForecastSchema = """{"type": "object", "properties": {"sky": {"enum": ["clear", "rain"]}, "temp": {"type": "integer", "minimum": -30, "maximum": 45}, "windy": {"type": "boolean"}}, "required": ["sky", "temp"], "additionalProperties": false}""";

    private static JsonObject SampledChat(string content) => new()
    {
        ["model"] = "tiny-qwen3-chat",
        ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = content }),
        ["temperature"] = 1, ["seed"] = 4, ["max_tokens"] = 200,
        ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false },
    };

    private static void AssertValid(string schema, string json) =>
        Assert.True(Json.Schema.JsonSchema.FromText(schema).Evaluate(System.Text.Json.JsonDocument.Parse(json).RootElement).IsValid, $"{json} is not valid under {schema}");

    [Fact]
    public async Task The_remote_mode_client_sends_structured_outputs_and_the_sampled_replies_keep_to_them()
    {
        var client = new RemoteChatClient(new Uri(fixture.Server.BaseAddress, "v1"), "tiny-qwen3-chat", ServerFixture.ApiKey);
        Microsoft.Extensions.AI.ChatMessage[] question = [new(ChatRole.User, "Answer?")];
        ChatOptions Sampled(object constraint, int seed) => new()
        {
            Temperature = 1, Seed = seed, MaxOutputTokens = 40,
            AdditionalProperties = new() { ["enable_thinking"] = false, ["structured_outputs"] = constraint },
        };
        for (int seed = 1; seed <= 3; seed++)
        {
            // The random tiny model would not write these by chance: the constraint reached the server's engine.
            var regex = await client.GetResponseAsync(question, Sampled(LocalVllm.Engine.StructuredOutputs.ForRegex("(yes|no), [0-9]{2}"), seed));
            Assert.Matches("^(yes|no), [0-9]{2}$", regex.Text);
            Assert.Equal(Microsoft.Extensions.AI.ChatFinishReason.Stop, regex.FinishReason);
            var schema = await client.GetResponseAsync(question, Sampled(JsonNode.Parse($$"""{"json": {{ForecastSchema}}}""")!, seed));
            AssertValid(ForecastSchema, schema.Text);
        }
    }

    /// <summary>vLLM's continue_final_message over HTTP, on /tokenize and from the remote-mode client: the prefilled reply goes on as the fixture's greedy reply does.</summary>
    [Fact]
    public async Task Continue_final_message_continues_a_prefilled_reply_over_HTTP_on_tokenize_and_in_remote_mode()
    {
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        int k = Enumerable.Range(1, 8).Last(n => tokenizer.Decode(greedy[..n]) is { Length: > 0 } t && t.Trim() == t);
        string prefill = tokenizer.Decode(greedy[..k]), rest = tokenizer.Decode(greedy[k..]);
        var body = GreedyChat(greedy.Length - k);
        body["messages"]!.AsArray().Add(new JsonObject { ["role"] = "assistant", ["content"] = prefill });
        body["continue_final_message"] = true;
        body["add_generation_prompt"] = false;
        var (status, json, _) = await Post("v1/chat/completions", body);
        Assert.True(status == HttpStatusCode.OK, json.ToJsonString());
        Assert.Equal(rest, json["choices"]![0]!["message"]!["content"]!.GetValue<string>());

        // vLLM's echo: the reply starts with the prefill, streamed or not.
        var echoBody = (JsonObject)body.DeepClone();
        echoBody["echo"] = true;
        var (_, echoed, _) = await Post("v1/chat/completions", echoBody);
        Assert.Equal(prefill + rest, echoed["choices"]![0]!["message"]!["content"]!.GetValue<string>());
        echoBody["stream"] = true;
        using (var streamed = await fixture.Http.PostAsync("v1/chat/completions", new StringContent(echoBody.ToJsonString(), Encoding.UTF8, "application/json")))
        {
            var events = (await streamed.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries).SkipLast(1)
                .Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();
            Assert.Equal(prefill, events[1]["choices"]![0]!["delta"]!["content"]!.GetValue<string>()); // right after the role
            Assert.Equal(prefill + rest, string.Concat(events.Select(e => e["choices"]![0]!["delta"]!["content"]?.GetValue<string>())));
        }

        var tokenize = new JsonObject { ["model"] = "tiny-qwen3-chat", ["messages"] = body["messages"]!.DeepClone(), ["continue_final_message"] = true,
            ["add_generation_prompt"] = false, ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false } };
        (status, json, _) = await Post("tokenize", tokenize);
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal([.. Fixtures.Ints(Case0["prompt_ids"]), .. greedy[..k]], Fixtures.Ints(json["tokens"]));

        var remote = new RemoteChatClient(new Uri(fixture.Server.BaseAddress, "v1"), "tiny-qwen3-chat", ServerFixture.ApiKey);
        var messages = Case0["messages"]!.AsArray().Select(m => new Microsoft.Extensions.AI.ChatMessage(new ChatRole(m!["role"]!.GetValue<string>()), m["content"]!.GetValue<string>()))
            .Append(new Microsoft.Extensions.AI.ChatMessage(ChatRole.Assistant, prefill)).ToList();
        var options = new ChatOptions
        {
            Temperature = 0, MaxOutputTokens = greedy.Length - k,
            AdditionalProperties = new() { ["enable_thinking"] = false, ["ignore_eos"] = true, ["continue_final_message"] = true },
        };
        Assert.Equal(rest, (await remote.GetResponseAsync(messages, options)).Text);

        body["add_generation_prompt"] = true;
        (status, json, _) = await Post("v1/chat/completions", body);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("cannot both be true", json["error"]!["message"]!.GetValue<string>());
    }

    /// <summary>vLLM's allowed_token_ids, stop_token_ids, bad_words and include_stop_str_in_output on chat, sent by the remote-mode client.</summary>
    [Fact]
    public async Task Allowed_and_stop_token_ids_bad_words_truncation_and_kept_stop_strings_reach_chat_from_the_remote_client()
    {
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        var remote = new RemoteChatClient(new Uri(fixture.Server.BaseAddress, "v1"), "tiny-qwen3-chat", ServerFixture.ApiKey);
        Microsoft.Extensions.AI.ChatMessage[] question = [new(ChatRole.User, "Hi")];
        int a = tokenizer.Encode("hello", addSpecialTokens: false)[0], b = tokenizer.Encode(" world", addSpecialTokens: false)[0];
        ChatOptions Options(params (string Key, object Value)[] extras)
        {
            var o = new ChatOptions { Temperature = 1, Seed = 5, MaxOutputTokens = 6, AdditionalProperties = new() { ["enable_thinking"] = false, ["ignore_eos"] = true } };
            foreach (var (key, value) in extras) o.AdditionalProperties[key] = value;
            return o;
        }
        // Only one token allowed: the reply is that token six times.
        var only = await remote.GetResponseAsync(question, Options(("allowed_token_ids", new[] { a })));
        Assert.Equal(tokenizer.Decode([a, a, a, a, a, a]), only.Text);
        // Two allowed, the second a stop token: the reply ends at its first appearance (at the latest after six tokens).
        var stopped = await remote.GetResponseAsync(question, Options(("allowed_token_ids", new[] { a, b }), ("stop_token_ids", new List<int> { b })));
        Assert.DoesNotContain(" world", stopped.Text);
        Assert.True(stopped.FinishReason == Microsoft.Extensions.AI.ChatFinishReason.Stop || stopped.Usage!.OutputTokenCount == 6, $"{stopped.FinishReason} after {stopped.Usage!.OutputTokenCount}");
        // A bad word that is one of the two allowed tokens: only the other remains.
        var clean = await remote.GetResponseAsync(question, Options(("allowed_token_ids", new[] { a, b }), ("bad_words", new[] { " world" })));
        Assert.Equal(tokenizer.Decode([a, a, a, a, a, a]), clean.Text);
        // The rendered prompt cut to its last five tokens.
        var cut = await remote.GetResponseAsync(question, Options(("truncate_prompt_tokens", 5)));
        Assert.Equal(5, cut.Usage!.InputTokenCount);
        // A stop string kept in the reply.
        var stopString = tokenizer.Decode([a, a]);
        var kept = Options(("allowed_token_ids", new[] { a }), ("include_stop_str_in_output", true));
        kept.StopSequences = [stopString];
        var keptReply = await remote.GetResponseAsync(question, kept);
        Assert.Equal(stopString, keptReply.Text);
        Assert.Equal(Microsoft.Extensions.AI.ChatFinishReason.Stop, keptReply.FinishReason);
    }

    [Fact]
    public async Task Response_format_json_schema_gives_content_the_schema_accepts()
    {
        var body = SampledChat("Forecast?");
        body["response_format"] = new JsonObject { ["type"] = "json_schema", ["json_schema"] = new JsonObject { ["name"] = "forecast", ["schema"] = JsonNode.Parse(ForecastSchema) } };
        var (status, json, _) = await Post("v1/chat/completions", body);
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal("stop", json["choices"]![0]!["finish_reason"]!.GetValue<string>());
        AssertValid(ForecastSchema, json["choices"]![0]!["message"]!["content"]!.GetValue<string>());
    }

    [Fact]
    public async Task Tool_choice_required_and_named_give_tool_calls_with_valid_arguments()
    {
        const string parameters = """{"type": "object", "properties": {"on": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["on", "level"]}""";
        var tools = new JsonArray(
            new JsonObject { ["type"] = "function", ["function"] = new JsonObject { ["name"] = "set_light", ["parameters"] = JsonNode.Parse(parameters) } },
            new JsonObject { ["type"] = "function", ["function"] = new JsonObject { ["name"] = "noop", ["parameters"] = JsonNode.Parse("""{"type": "object", "properties": {}}""") } });
        foreach (JsonNode choice in new JsonNode[] { "required", new JsonObject { ["type"] = "function", ["function"] = new JsonObject { ["name"] = "set_light" } } })
        {
            var body = SampledChat("Lights!");
            body["tools"] = tools.DeepClone();
            body["tool_choice"] = choice.DeepClone();
            var (status, json, _) = await Post("v1/chat/completions", body);
            Assert.True(status == HttpStatusCode.OK, json.ToJsonString());
            Assert.Equal("tool_calls", json["choices"]![0]!["finish_reason"]!.GetValue<string>());
            var calls = json["choices"]![0]!["message"]!["tool_calls"]!.AsArray();
            Assert.NotEmpty(calls);
            foreach (var call in calls)
            {
                var name = call!["function"]!["name"]!.GetValue<string>();
                if (choice is JsonObject) Assert.Equal("set_light", name);
                AssertValid(name == "set_light" ? parameters : """{"type": "object", "properties": {}}""", call["function"]!["arguments"]!.GetValue<string>());
            }
        }
    }

    /// <summary>vLLM's prompt_logprobs on chat: the rendered prompt's, as /v1/completions gives them for the same ids; refused when streaming.</summary>
    [Fact]
    public async Task Chat_prompt_logprobs_are_those_of_the_rendered_prompt()
    {
        var chat = GreedyChat(2);
        chat["prompt_logprobs"] = 2;
        var (status, json, _) = await Post("v1/chat/completions", chat);
        Assert.True(status == HttpStatusCode.OK, json.ToJsonString());
        var positions = json["prompt_logprobs"]!.AsArray();
        var ids = Fixtures.Ints(Case0["prompt_ids"]);
        Assert.Equal(ids.Length, positions.Count);
        Assert.Null(positions[0]);
        var (_, completion, _) = await Post("v1/completions", new JsonObject
        {
            ["model"] = "tiny-qwen3-chat", ["prompt"] = new JsonArray(ids.Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = 1, ["prompt_logprobs"] = 2,
        });
        var reference = completion["choices"]![0]!["prompt_logprobs"]!.AsArray();
        for (int i = 1; i < ids.Length; i++)
            Assert.Equal(reference[i]![ids[i].ToString()]!["logprob"]!.GetValue<double>(), positions[i]![ids[i].ToString()]!["logprob"]!.GetValue<double>(), 5);
        chat["stream"] = true;
        (status, json, _) = await Post("v1/chat/completions", chat);
        Assert.Equal((HttpStatusCode.BadRequest, "prompt_logprobs"), (status, json["error"]!["param"]!.GetValue<string>()));
    }

    /// <summary>Clients that send every field, unset ones as JSON null (as some frameworks do), get the defaults.</summary>
    [Fact]
    public async Task Fields_sent_as_null_mean_unset_on_chat_and_completions()
    {
        var chat = GreedyChat(4);
        foreach (var key in new[] { "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "user", "tools", "tool_choice",
                     "response_format", "seed", "logprobs", "top_logprobs", "stream_options", "parallel_tool_calls", "max_completion_tokens", "min_p", "top_k",
                     "stop_token_ids", "allowed_token_ids", "bad_words", "priority", "truncate_prompt_tokens", "reasoning_effort", "metadata", "store" })
            chat[key] = null;
        var (status, json, _) = await Post("v1/chat/completions", chat);
        Assert.True(status == HttpStatusCode.OK, json.ToJsonString());
        Assert.Equal(4, json["usage"]!["completion_tokens"]!.GetValue<int>());

        var completion = new JsonObject { ["model"] = "tiny-qwen3-chat", ["prompt"] = "Hi", ["max_tokens"] = 3, ["ignore_eos"] = true };
        foreach (var key in new[] { "temperature", "top_p", "n", "stop", "logprobs", "echo", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
                     "user", "stream", "stream_options", "suffix", "best_of", "stop_token_ids", "allowed_token_ids", "bad_words", "priority", "truncate_prompt_tokens",
                     "skip_special_tokens", "include_stop_str_in_output", "prompt_logprobs", "min_tokens" })
            completion[key] = null;
        (status, json, _) = await Post("v1/completions", completion);
        Assert.True(status == HttpStatusCode.OK, json.ToJsonString());
        Assert.Equal(3, json["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task A_priority_under_first_come_first_served_scheduling_is_refused_by_name()
    {
        var (status, json, _) = await Post("v1/completions", new JsonObject { ["model"] = "tiny-qwen3-chat", ["prompt"] = "Hi", ["max_tokens"] = 2, ["priority"] = 1 });
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("--scheduling-policy", json["error"]!["message"]!.GetValue<string>());
        var chat = GreedyChat(2);
        chat["priority"] = -3;
        (status, json, _) = await Post("v1/chat/completions", chat);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("Priority (priority) is -3", json["error"]!["message"]!.GetValue<string>());
    }

    [Fact]
    public async Task Completions_take_vllm_structured_outputs_and_the_older_guided_fields()
    {
        var body = new JsonObject { ["model"] = "tiny-qwen3-chat", ["prompt"] = "The answer:", ["max_tokens"] = 30, ["seed"] = 1, ["structured_outputs"] = new JsonObject { ["regex"] = "(yes|no), [0-9]{2}" } };
        var (status, json, _) = await Post("v1/completions", body);
        Assert.True(status == HttpStatusCode.OK, json.ToJsonString());
        Assert.Matches("^(yes|no), [0-9]{2}$", json["choices"]![0]!["text"]!.GetValue<string>());
        body.Remove("structured_outputs");
        body["guided_choice"] = new JsonArray("red", "green", "blue");
        (status, json, _) = await Post("v1/completions", body);
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Contains(json["choices"]![0]!["text"]!.GetValue<string>(), new[] { "red", "green", "blue" });

        body.Remove("guided_choice");
        body["structured_outputs"] = new JsonObject { ["json"] = JsonNode.Parse("""{"type": "object", "not": {}}""") };
        (status, json, _) = await Post("v1/completions", body);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("'not'", json["error"]!["message"]!.GetValue<string>());
        body["structured_outputs"] = new JsonObject { ["regex"] = "a", ["choice"] = new JsonArray("a") };
        (status, json, _) = await Post("v1/completions", body);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("exactly one", json["error"]!["message"]!.GetValue<string>());
    }

}

/// <summary>A server that runs one sequence and queues one more: a third request is refused with 429 and Retry-After.</summary>
public sealed class ServerOverloadTests
{
    /// <summary>Posts <paramref name="body"/> and returns the JSON answer, which must be a success.</summary>
    private static async Task<JsonNode> PostOk(HttpClient http, string path, JsonObject body)
    {
        using var response = await http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"{path}: {(int)response.StatusCode} {text}");
        return JsonNode.Parse(text)!;
    }

    /// <summary>
    /// --scheduling-policy priority with one slot: a long request A (priority 9) runs; B, of the same priority, waits
    /// behind it (no preemption); C (priority 0, over HTTP) takes A's slot at once and finishes while A and B wait.
    /// </summary>
    [Fact]
    public async Task Under_priority_scheduling_a_more_urgent_request_takes_the_slot_and_an_equal_one_waits()
    {
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("tiny-qwen3-chat"), "--port", "0", "--kv-cache-memory", "32M",
            "--max-num-seqs", "1", "--scheduling-policy", "priority"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        static StringContent Body(int maxTokens, int priority, bool stream = false) => new(new JsonObject
        {
            ["prompt"] = "Hi", ["max_tokens"] = maxTokens, ["ignore_eos"] = true, ["temperature"] = 0, ["priority"] = priority, ["stream"] = stream,
        }.ToJsonString(), Encoding.UTF8, "application/json");
        var engine = server.Engine.Engine;
        async Task<(int Waiting, long Preemptions)> State()
        {
            (int, long) state = default;
            await engine.InvokeAsync(e => state = (e.Scheduler.NumWaiting, e.Scheduler.NumPreemptions));
            return state;
        }

        // A is long enough (30,000 tokens) to outlast the test by far, and its events are read as they come (an unread
        // stream could be cut by Kestrel's minimum data rate, freeing the slot).
        var a = await http.SendAsync(new HttpRequestMessage(HttpMethod.Post, "v1/completions") { Content = Body(30000, 9, stream: true) }, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, a.StatusCode); // A runs (its first event has arrived)
        var aStream = await a.Content.ReadAsStreamAsync();
        // (Disposing A's response below ends this read with whichever exception the client raises for a closed stream.)
        var drain = Task.Run(async () => { try { await aStream.CopyToAsync(Stream.Null); } catch (Exception) { } });
        // B, of A's priority, is added on the engine thread itself: queued once this call returns, with no waiting on time.
        string b = "";
        await engine.InvokeAsync(e => b = e.AddRequest(e.EncodePrompt("Hi"), new Engine.SamplingParams { Temperature = 0, MaxTokens = 8, IgnoreEos = true, Priority = 9 }));
        Assert.Equal((1, 0L), await State()); // an equal priority does not displace A

        using var c = await http.PostAsync("v1/completions", Body(8, 0)).WaitAsync(ServerTests.HangGuard);
        Assert.Equal(HttpStatusCode.OK, c.StatusCode);
        Assert.True((await State()).Preemptions >= 1); // C took A's slot
        string queue = "";
        bool bWaiting = false;
        await engine.InvokeAsync(e =>
        {
            queue = string.Join("; ", e.Scheduler.Unfinished.Select(q => $"{q.RequestId} priority {q.Sampling.Priority} {q.Status} {q.NumTokens} tokens"));
            bWaiting = e.Scheduler.Unfinished.Any(q => q.RequestId == b && q.Status == Engine.Core.SequenceStatus.Waiting);
        });
        Assert.True(bWaiting, $"B is not waiting behind A, which got its slot back; the engine holds: {queue}");
        a.Dispose(); // A's client goes: its request is aborted, and B runs to its end
        await drain.WaitAsync(ServerTests.HangGuard);
        await engine.WhenIdleAsync().WaitAsync(ServerTests.HangGuard);
        await engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }

    [Fact]
    public async Task A_full_queue_answers_429_with_retry_after()
    {
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(
            ["--model", Fixtures.Model("tiny-qwen3-chat"), "--port", "0", "--kv-cache-memory", "8M", "--max-num-seqs", "1", "--max-waiting-requests", "1"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        static StringContent Body(int maxTokens, bool stream) => new(new JsonObject
        {
            ["messages"] = new JsonArray { new JsonObject { ["role"] = "user", ["content"] = "hi" } }, ["max_tokens"] = maxTokens, ["ignore_eos"] = true, ["stream"] = stream,
        }.ToJsonString(), Encoding.UTF8, "application/json");
        // A runs (its first event has arrived), B is queued behind it on the engine thread itself, C finds the queue full.
        using var a = await http.SendAsync(new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = Body(5000, true) }, HttpCompletionOption.ResponseHeadersRead);
        string? b = null;
        int waiting = 0;
        await server.Engine.Engine.InvokeAsync(e =>
        {
            b = e.AddRequest([1, 2, 3], new Engine.SamplingParams { MaxTokens = 4 });
            waiting = e.Scheduler.NumWaiting;
        });
        Assert.Equal(1, waiting);
        // Stats (what the HTTP path checks the queue against) are published after each step: wait for one.
        await server.Engine.Engine.InvokeAsync(_ => { });
        using var response = await http.PostAsync("v1/chat/completions", Body(2, false));
        Assert.True(response.StatusCode == HttpStatusCode.TooManyRequests, await response.Content.ReadAsStringAsync());
        Assert.Equal("1", response.Headers.RetryAfter!.ToString());
        var error = JsonNode.Parse(await response.Content.ReadAsStringAsync())!["error"]!;
        Assert.Equal("server_overloaded", error["type"]!.GetValue<string>());
        Assert.Contains("MaxWaitingRequests = 1", error["message"]!.GetValue<string>());
        await server.Engine.Engine.InvokeAsync(e => e.Abort(b!));
    }

    [Fact]
    public async Task A_base_model_serves_completions_with_the_reference_text_streamed_under_a_stream_interval_and_refuses_chat()
    {
        const int interval = 3;
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
            "--stream-interval", $"{interval}"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var c = Fixtures.Reference("stories260K")["cases"]![0]!; // llama2.c's own continuation of the prompt
        int tokens = Fixtures.Ints(c["greedy_ids"]).Length;
        var body = new JsonObject { ["prompt"] = c["text"]!.GetValue<string>(), ["temperature"] = 0, ["max_tokens"] = tokens, ["ignore_eos"] = true };
        using var response = await http.PostAsync("v1/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        var json = JsonNode.Parse(await response.Content.ReadAsStringAsync())!;
        Assert.Equal(c["greedy_text"]!.GetValue<string>(), json["choices"]![0]!["text"]!.GetValue<string>());
        Assert.Equal(Fixtures.Ints(c["prompt_ids"]).Length, json["usage"]!["prompt_tokens"]!.GetValue<int>());

        // Streamed under --stream-interval: the same text in at most one event for the first token and one per
        // interval after it (the finish rides on the last).
        body["stream"] = true;
        using var streamed = await http.PostAsync("v1/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        var events = (await streamed.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)[..^1]
            .Select(e => JsonNode.Parse(e["data: ".Length..])!["choices"]![0]!["text"]!.GetValue<string>()).ToList();
        Assert.Equal(c["greedy_text"]!.GetValue<string>(), string.Concat(events));
        Assert.InRange(events.Count, 2, 1 + (tokens - 1 + interval - 1) / interval);

        var chat = new JsonObject { ["messages"] = new JsonArray { new JsonObject { ["role"] = "user", ["content"] = "hi" } } };
        using var refused = await http.PostAsync("v1/chat/completions", new StringContent(chat.ToJsonString(), Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, refused.StatusCode);
        Assert.Contains("no chat template", await refused.Content.ReadAsStringAsync());
    }

    /// <summary>
    /// --chat-template gives a base model (stories260K, no template of its own) TinyLlama's real template: a chat
    /// completion is then the completion of the prompt /tokenize renders from the same messages, token for token.
    /// </summary>
    [Fact]
    public async Task A_base_model_given_a_chat_template_serves_chat_as_the_completion_of_its_rendered_prompt()
    {
        var template = Path.Combine(Fixtures.Root, "tokenizers", "chat_templates", "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja");
        var mismatch = Assert.Throws<ArgumentException>(() => LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0",
            "--kv-cache-memory", "8M", "--chat-template", template, "--tool-call-parser", "llama3_json"])));
        Assert.Contains("--tool-call-parser llama3_json does not match the chat template, which has the model write tool calls as hermes", mismatch.Message);
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
            "--chat-template", template, "--tool-call-parser", "hermes"]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        Task<JsonNode> Post(string path, JsonObject body) => PostOk(http, path, body);
        JsonArray Messages() => [new JsonObject { ["role"] = "system", ["content"] = "You tell stories." }, new JsonObject { ["role"] = "user", ["content"] = "Tell me about a cat." }];

        var rendered = await Post("tokenize", new JsonObject { ["messages"] = Messages() });
        var chat = await Post("v1/chat/completions", new JsonObject { ["messages"] = Messages(), ["temperature"] = 0, ["max_tokens"] = 12, ["ignore_eos"] = true });
        var completion = await Post("v1/completions", new JsonObject { ["prompt"] = rendered["tokens"]!.DeepClone(), ["temperature"] = 0, ["max_tokens"] = 12, ["ignore_eos"] = true });
        Assert.Equal(rendered["count"]!.GetValue<int>(), chat["usage"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(completion["choices"]![0]!["text"]!.GetValue<string>(), chat["choices"]![0]!["message"]!["content"]!.GetValue<string>());
        Assert.Equal(12, chat["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    /// <summary>
    /// --generation-config vllm with --override-generation-config: what a request leaves unset comes from the
    /// overrides, on completions (temperature 0 and max_new_tokens give llama2.c's greedy continuation where OpenAI's
    /// defaults would sample 16 tokens at temperature 1) and on chat (max_new_tokens caps a reply that sets no limit).
    /// </summary>
    [Fact]
    public async Task Generation_config_flags_fill_what_completions_and_chat_requests_leave_unset()
    {
        var c = Fixtures.Reference("stories260K")["cases"]![0]!;
        int tokens = Fixtures.Ints(c["greedy_ids"]).Length;
        var template = Path.Combine(Fixtures.Root, "tokenizers", "chat_templates", "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja");
        Assert.Contains("--override-generation-config needs a JSON object of numbers", Assert.Throws<ArgumentException>(() =>
            ServerOptions.Parse(["--model", "m", "--override-generation-config", "temperature=0"])).Message);
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
            "--chat-template", template, "--generation-config", "vllm", "--override-generation-config", $$"""{"temperature": 0, "max_new_tokens": {{tokens}}}"""]));
        await server.StartAsync();
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        Task<JsonNode> Post(string path, JsonObject body) => PostOk(http, path, body);

        var completion = await Post("v1/completions", new JsonObject { ["prompt"] = c["text"]!.GetValue<string>(), ["ignore_eos"] = true });
        Assert.Equal(c["greedy_text"]!.GetValue<string>(), completion["choices"]![0]!["text"]!.GetValue<string>());

        var chat = await Post("v1/chat/completions", new JsonObject
        {
            ["messages"] = new JsonArray { new JsonObject { ["role"] = "user", ["content"] = "Tell me about a cat." } }, ["ignore_eos"] = true,
        });
        Assert.Equal(tokens, chat["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    /// <summary>
    /// CORS as vLLM serves it: by default a browser's preflight from any origin gets its answer before the API-key check
    /// and responses carry Access-Control-Allow-Origin; with --allowed-origins only the listed origins are answered.
    /// </summary>
    [Fact]
    public async Task Browsers_get_cors_answers_for_any_origin_by_default_and_only_the_allowed_ones_when_listed_also_under_a_root_path()
    {
        async Task<HttpResponseMessage> Preflight(HttpClient http, string origin)
        {
            using var request = new HttpRequestMessage(HttpMethod.Options, "v1/chat/completions");
            request.Headers.Add("Origin", origin);
            request.Headers.Add("Access-Control-Request-Method", "POST");
            request.Headers.Add("Access-Control-Request-Headers", "authorization,content-type");
            return await http.SendAsync(request);
        }
        static string? Allowed(HttpResponseMessage r) => r.Headers.TryGetValues("Access-Control-Allow-Origin", out var v) ? v.Single() : null;

        await using (var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M", "--api-key", "k"])))
        {
            await server.StartAsync();
            using var http = new HttpClient { BaseAddress = server.BaseAddress };
            using var preflight = await Preflight(http, "http://app.example");
            Assert.Equal(HttpStatusCode.NoContent, preflight.StatusCode);
            Assert.Equal("*", Allowed(preflight));
            Assert.Contains("authorization", string.Join(",", preflight.Headers.GetValues("Access-Control-Allow-Headers")), StringComparison.OrdinalIgnoreCase);
            using var models = new HttpRequestMessage(HttpMethod.Get, "v1/models");
            models.Headers.Add("Origin", "http://app.example");
            models.Headers.Authorization = new System.Net.Http.Headers.AuthenticationHeaderValue("Bearer", "k");
            using var listed = await http.SendAsync(models);
            Assert.Equal(HttpStatusCode.OK, listed.StatusCode);
            Assert.Equal("*", Allowed(listed));
        }
        await using (var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
            "--allowed-origins", "[\"http://app.example\"]", "--root-path", "/llm/"])))
        {
            await server.StartAsync();
            // (--root-path: the routes answer under the proxy's prefix, and without it.)
            using var http = new HttpClient { BaseAddress = new Uri(server.BaseAddress, "llm/") };
            using var prefixed = await http.GetAsync("v1/models");
            Assert.Equal(HttpStatusCode.OK, prefixed.StatusCode);
            using var bare = await new HttpClient { BaseAddress = server.BaseAddress }.GetAsync("v1/models");
            Assert.Equal(HttpStatusCode.OK, bare.StatusCode);
            using var listedOrigin = await Preflight(http, "http://app.example");
            Assert.Equal("http://app.example", Allowed(listedOrigin));
            using var other = await Preflight(http, "http://elsewhere.example");
            Assert.Null(Allowed(other));
        }
        Assert.Contains("--allowed-origins needs a JSON list", Assert.Throws<ArgumentException>(() => ServerOptions.Parse(["--model", "m", "--allowed-origins", "*"])).Message);
    }

    /// <summary>--ssl-certfile and --ssl-keyfile serve HTTPS with that certificate (a self-signed one made here).</summary>
    /// <summary>
    /// --http2 serves HTTP/2 without TLS (prior knowledge): many streamed completions over one connection give the
    /// reference text, as HTTP/1.1 does, and an HTTP/1.1 request is refused by Kestrel with a 400 that says why.
    /// </summary>
    [Fact]
    public async Task Http2_without_tls_multiplexes_streams_on_one_connection()
    {
        var c = Fixtures.Reference("stories260K")["cases"]![0]!;
        var greedy = Fixtures.Ints(c["greedy_ids"]);
        await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M", "--http2"]));
        await server.StartAsync();
        int connections = 0;
        using var handler = new SocketsHttpHandler
        {
            EnableMultipleHttp2Connections = false,
            ConnectCallback = async (context, token) =>
            {
                Interlocked.Increment(ref connections);
                var socket = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp) { NoDelay = true };
                await socket.ConnectAsync(context.DnsEndPoint, token);
                return new System.Net.Sockets.NetworkStream(socket, ownsSocket: true);
            },
        };
        using var http = new HttpClient(handler) { BaseAddress = server.BaseAddress };
        var body = new JsonObject
        {
            ["prompt"] = new JsonArray(Fixtures.Ints(c["prompt_ids"]).Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = greedy.Length,
            ["temperature"] = 0, ["ignore_eos"] = true, ["stream"] = true,
        };
        async Task<string> Stream()
        {
            using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
            {
                Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"),
                Version = HttpVersion.Version20, VersionPolicy = HttpVersionPolicy.RequestVersionExact,
            };
            using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
            Assert.Equal((HttpStatusCode.OK, HttpVersion.Version20), (response.StatusCode, response.Version));
            var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal("data: [DONE]", events[^1]);
            return string.Concat(events[..^1].Select(e => JsonNode.Parse(e["data: ".Length..])!["choices"]![0]!["text"]!.GetValue<string>()));
        }
        var texts = await Task.WhenAll(Enumerable.Range(0, 8).Select(_ => Stream()));
        Assert.All(texts, t => Assert.Equal(c["greedy_text"]!.GetValue<string>(), t));
        Assert.Equal(1, connections);

        using var plain = new HttpClient { BaseAddress = server.BaseAddress };
        var h1 = await plain.PostAsync("v1/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, h1.StatusCode);
    }

    [Fact]
    public async Task Https_is_served_with_the_given_pem_certificate_and_key()
    {
        using var key = System.Security.Cryptography.ECDsa.Create(System.Security.Cryptography.ECCurve.NamedCurves.nistP256);
        var request = new System.Security.Cryptography.X509Certificates.CertificateRequest("CN=localhost", key, System.Security.Cryptography.HashAlgorithmName.SHA256);
        using var cert = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddHours(1));
        var dir = Directory.CreateTempSubdirectory("localvllm-tls-").FullName;
        try
        {
            string certFile = Path.Combine(dir, "cert.pem"), keyFile = Path.Combine(dir, "key.pem");
            File.WriteAllText(certFile, cert.ExportCertificatePem());
            File.WriteAllText(keyFile, key.ExportPkcs8PrivateKeyPem());
            await using var server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M",
                "--ssl-certfile", certFile, "--ssl-keyfile", keyFile]));
            await server.StartAsync();
            Assert.Equal("https", server.BaseAddress.Scheme);
            string? seen = null;
            using var handler = new HttpClientHandler { ServerCertificateCustomValidationCallback = (_, c, _, _) => (seen = c?.Thumbprint) == cert.Thumbprint };
            using var http = new HttpClient(handler) { BaseAddress = server.BaseAddress };
            using var health = await http.GetAsync("health");
            Assert.Equal(HttpStatusCode.OK, health.StatusCode);
            Assert.Equal(cert.Thumbprint, seen);
            // HTTP/2 is offered beside HTTP/1.1 (ALPN): a client that asks for it gets it.
            using var h2 = await http.SendAsync(new HttpRequestMessage(HttpMethod.Get, "health") { Version = HttpVersion.Version20, VersionPolicy = HttpVersionPolicy.RequestVersionExact });
            Assert.Equal((HttpStatusCode.OK, HttpVersion.Version20), (h2.StatusCode, h2.Version));

            Assert.Contains("needs both --ssl-certfile and --ssl-keyfile", Assert.Throws<ArgumentException>(() => ServerOptions.Parse(["--model", "m", "--ssl-certfile", certFile])).Message);
            Assert.Contains("--ssl-keyfile: no such file", Assert.Throws<ArgumentException>(() => ServerOptions.Parse(["--model", "m", "--ssl-certfile", certFile, "--ssl-keyfile", keyFile + ".missing"])).Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task Shutdown_stops_accepting_and_aborts_a_stream_still_running_after_the_grace_period()
    {
        // The scripted stream never finishes by itself: only the abort at the end of the grace period can end it.
        var engine = new ScriptedEngine(["Still", " going"]) { HoldOpen = true };
        var server = LocalVllmServer.CreateOverChatEngine(ServerOptions.Parse(["--model", "scripted", "--port", "0", "--shutdown-timeout", "1"]), engine);
        try
        {
            await server.StartAsync();
            using var http = new HttpClient { BaseAddress = server.BaseAddress };
            var request = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions")
            {
                Content = new StringContent(new JsonObject
                {
                    ["messages"] = new JsonArray { new JsonObject { ["role"] = "user", ["content"] = "hi" } }, ["stream"] = true,
                }.ToJsonString(), Encoding.UTF8, "application/json"),
            };
            using var open = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
            var reader = new StreamReader(await open.Content.ReadAsStreamAsync());
            Assert.StartsWith("data: ", await reader.ReadLineAsync());

            await server.App.StopAsync();
            await engine.Cancelled.Task.WaitAsync(ServerTests.HangGuard); // the open request was aborted when the grace period ended
            bool done = false;
            try { while (await reader.ReadLineAsync() is { } line) done |= line == "data: [DONE]"; } catch (IOException) { } catch (HttpRequestException) { }
            Assert.False(done);
            await Assert.ThrowsAnyAsync<HttpRequestException>(() => http.GetAsync("health"));
        }
        finally
        {
            await server.DisposeAsync();
        }
    }

    [Theory]
    [InlineData(new string[0], "--model is required")]
    [InlineData(new[] { "--model", "m", "--frobnicate" }, "Unknown option '--frobnicate'")]
    [InlineData(new[] { "--model", "m", "--port" }, "--port needs a value")]
    [InlineData(new[] { "--model", "m", "--tensor-parallel-size", "2" }, "--tensor-parallel-size must be 1")]
    [InlineData(new[] { "--model", "m", "--gpu-memory-utilization", "0.9" }, "size the KV cache with --kv-cache-memory")]
    [InlineData(new[] { "--model", "m", "--speculative-config", "{\"method\": \"eagle\"}" }, "Speculative method 'eagle' is not served")]
    [InlineData(new[] { "--model", "m", "--kv-cache-memory", "lots" }, "--kv-cache-memory needs a size")]
    [InlineData(new[] { "--model", "m", "--tool-call-parser", "pythonic" }, "--tool-call-parser 'pythonic' is not supported")]
    [InlineData(new[] { "--model", "m", "--reasoning-parser", "granite" }, "--reasoning-parser 'granite' is not supported")]
    public void The_command_line_names_what_is_wrong(string[] args, string message) =>
        Assert.Contains(message, Assert.Throws<ArgumentException>(() => ServerOptions.Parse(args)).Message);

    [Fact]
    public void The_model_may_come_first_as_in_vllm_serve_and_the_api_key_from_VLLM_API_KEY()
    {
        var env = new Dictionary<string, string?> { ["VLLM_API_KEY"] = "from-env" };
        var o = ServerOptions.Parse(["Qwen/Qwen3-0.6B", "--port", "9001"], env.GetValueOrDefault);
        Assert.Equal(("Qwen/Qwen3-0.6B", 9001, "from-env"), (o.Model, o.Port, o.ApiKey));
        Assert.Equal("given", ServerOptions.Parse(["--model", "m", "--api-key", "given"], env.GetValueOrDefault).ApiKey); // the flag wins
        Assert.Null(ServerOptions.Parse(["m"], _ => null).ApiKey);
        Assert.Contains("Unknown option 'extra'", Assert.Throws<ArgumentException>(() => ServerOptions.Parse(["m", "extra"], _ => null)).Message);
    }

    [Fact]
    public void The_command_line_takes_vllm_flags()
    {
        var o = ServerOptions.Parse(["--model", "Qwen/Qwen3-0.6B", "--port=9000", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
            "--block-size", "32", "--max-model-len", "4096", "--kv-cache-memory", "1.5G", "--dtype", "bf16", "--served-model-name", "qwen", "--no-enable-prefix-caching",
            "--weight-dtype", "bf16", "--quantization", "int8", "--stream-interval", "4", "--chat-template", "{{ messages[0].content }}",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser=qwen3", "--max-logprobs", "5",
            "--speculative-config", """{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}""",
            "--seed", "7", "--download-dir", "/tmp/hub", "--hf-token", "hf_x", "-tp", "1", "--pipeline-parallel-size=1",
            "--enable-chunked-prefill", "--enforce-eager", "--trust-remote-code"]);
        Assert.Equal((7, "/tmp/hub", "hf_x"), (o.Engine.Seed, o.Engine.Hub!.CacheDir, o.Engine.Hub.Token));
        Assert.Equal(("Qwen/Qwen3-0.6B", 9000, "qwen", "127.0.0.1"), (o.Model, o.Port, o.ServedModelName, o.Host));
        Assert.Equal((4, "{{ messages[0].content }}", "hermes", 5), (o.Engine.StreamInterval, o.Engine.ChatTemplate, o.ToolCallParser, o.Engine.MaxLogprobs));
        Assert.Equal(("bfloat16", "int8"), (o.Engine.WeightDType, o.Engine.Quantization));
        Assert.Equal(new LocalVllm.Engine.SpeculativeConfig { NumSpeculativeTokens = 5, PromptLookupMax = 3, PromptLookupMin = 2 }, o.Engine.Speculative);
        Assert.Equal((8, 512, 32, 4096, (long)(1.5 * (1L << 30)), "bfloat16", false),
            (o.Engine.MaxNumSeqs, o.Engine.MaxNumBatchedTokens, o.Engine.BlockSize, o.Engine.MaxModelLen!.Value, o.Engine.KvCacheMemoryBytes!.Value, o.Engine.DType, o.Engine.EnablePrefixCaching));
    }
}
