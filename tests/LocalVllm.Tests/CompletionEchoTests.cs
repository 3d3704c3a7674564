using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Server;

namespace LocalVllm.Tests;

/// <summary>
/// Completions with <c>echo</c>, <c>logprobs</c> and vLLM's <c>prompt_logprobs</c> on the trained stories260K model:
/// the request shape evaluation harnesses use to score a text (echo, logprobs 1, max_tokens 1), checked against the
/// fixture's reference continuation and logits and against a plain run that generated the same tokens.
/// </summary>
public sealed class CompletionEchoTests : IAsyncLifetime
{
    private static readonly JsonNode Case = Fixtures.Reference("stories260K")["cases"]![0]!; // "Once upon a time", llama2.c's continuation
    private LocalVllmServer _server = null!;
    private HttpClient _http = null!;

    public async Task InitializeAsync()
    {
        _server = LocalVllmServer.Create(ServerOptions.Parse(["--model", Fixtures.Model("stories260K"), "--port", "0", "--kv-cache-memory", "8M"]));
        await _server.StartAsync();
        _http = new HttpClient { BaseAddress = _server.BaseAddress };
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        await _server.DisposeAsync();
    }

    private async Task<(HttpStatusCode Status, string Body)> Post(JsonObject body)
    {
        using var response = await _http.PostAsync("v1/completions", new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, await response.Content.ReadAsStringAsync());
    }

    private async Task<JsonNode> Choice(JsonObject body)
    {
        var (status, text) = await Post(body);
        Assert.True(status == HttpStatusCode.OK, text);
        return JsonNode.Parse(text)!["choices"]![0]!;
    }

    /// <summary>The choices' chunks of a streamed completion (the usage chunk and [DONE] left out).</summary>
    private async Task<List<JsonNode>> StreamedChoices(JsonObject body)
    {
        body["stream"] = true;
        var (status, text) = await Post(body);
        Assert.True(status == HttpStatusCode.OK, text);
        return text.Split("\n\n", StringSplitOptions.RemoveEmptyEntries).Where(e => e != "data: [DONE]")
            .SelectMany(e => JsonNode.Parse(e["data: ".Length..])!["choices"]!.AsArray()).Select(c => c!).ToList();
    }

    [Fact]
    public async Task Echo_returns_the_prompt_before_the_reference_continuation_streamed_and_not()
    {
        string prompt = Case["text"]!.GetValue<string>();
        int tokens = Fixtures.Ints(Case["greedy_ids"]).Length;
        JsonObject Body() => new() { ["prompt"] = prompt, ["max_tokens"] = tokens, ["temperature"] = 0, ["ignore_eos"] = true, ["echo"] = true };
        Assert.Equal(Case["full_text"]!.GetValue<string>(), (await Choice(Body()))["text"]!.GetValue<string>());

        var events = await StreamedChoices(Body());
        Assert.StartsWith(prompt, events[0]["text"]!.GetValue<string>());
        Assert.Equal(Case["full_text"]!.GetValue<string>(), string.Concat(events.Select(e => e["text"]!.GetValue<string>())));
    }

    [Fact]
    public async Task Echo_with_logprobs_scores_the_prompt_as_the_generating_run_scored_the_same_tokens()
    {
        var prompt = Fixtures.Ints(Case["prompt_ids"]);
        var greedy = Fixtures.Ints(Case["greedy_ids"]);
        const int continued = 8;
        // A plain run that generates greedy[0..continued] with their log-probabilities.
        var plain = (await Choice(new JsonObject
        {
            ["prompt"] = new JsonArray(prompt.Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = continued + 1, ["temperature"] = 0, ["logprobs"] = 2,
        }))["logprobs"]!;
        var plainLogprobs = plain["token_logprobs"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
        // Its first token's log-probability against the reference logits' log-softmax (transformers, independently).
        var last = Fixtures.Floats(Case["last_logits"]).Select(x => (double)x).ToArray();
        double max = last.Max(), lse = max + Math.Log(last.Sum(x => Math.Exp(x - max)));
        Assert.True(Math.Abs(plainLogprobs[0] - (last[greedy[0]] - lse)) <= 1e-4, $"{plainLogprobs[0]} against {last[greedy[0]] - lse}");

        // The harness's request: the prompt and the continuation as the text to score, echo, one generated token.
        JsonObject Scored() => new()
        {
            ["prompt"] = new JsonArray(prompt.Concat(greedy.Take(continued)).Select(t => (JsonNode?)t).ToArray()),
            ["max_tokens"] = 1, ["temperature"] = 0, ["logprobs"] = 2, ["echo"] = true,
        };
        var scored = (await Choice(Scored()))["logprobs"]!;
        var tokenLogprobs = scored["token_logprobs"]!.AsArray();
        var top = scored["top_logprobs"]!.AsArray();
        Assert.Equal(prompt.Length + continued + 1, tokenLogprobs.Count);
        Assert.Null(tokenLogprobs[0]);
        Assert.Null(top[0]);
        for (int j = 0; j <= continued; j++)
        {
            // Positions of the continuation (and the one generated token) score as the run that generated them did,
            // and each is the most likely token there (the harness's is-greedy check).
            double lp = tokenLogprobs[prompt.Length + j]!.GetValue<double>();
            Assert.True(Math.Abs(lp - plainLogprobs[j]) <= 1e-4, $"position {prompt.Length + j}: {lp} against {plainLogprobs[j]}");
            var alternatives = top[prompt.Length + j]!.AsObject().Select(kv => kv.Value!.GetValue<double>()).ToList();
            Assert.Equal(2, alternatives.Count);
            Assert.Equal(alternatives.Max(), lp, 5);
        }
        for (int i = 1; i < prompt.Length; i++) Assert.True(tokenLogprobs[i]!.GetValue<double>() <= 0);
        // Text offsets run on by each token's text.
        var tokens = scored["tokens"]!.AsArray().Select(t => t!.GetValue<string>()).ToArray();
        var offsets = scored["text_offset"]!.AsArray().Select(o => o!.GetValue<int>()).ToArray();
        Assert.Equal(0, offsets[0]);
        for (int i = 1; i < tokens.Length; i++) Assert.Equal(offsets[i - 1] + tokens[i - 1].Length, offsets[i]);

        // Streamed: the same log-probabilities, the prompt's in the first event.
        var events = await StreamedChoices(Scored());
        var streamed = events.SelectMany(e => e["logprobs"]!["token_logprobs"]!.AsArray()).Select(x => x?.GetValue<double>()).ToList();
        Assert.Equal(tokenLogprobs.Select(x => x?.GetValue<double>()), streamed);
        Assert.Equal(offsets, events.SelectMany(e => e["logprobs"]!["text_offset"]!.AsArray()).Select(o => o!.GetValue<int>()));
    }

    [Fact]
    public async Task Completions_take_include_stop_str_in_output_bad_words_and_allowed_token_ids()
    {
        string reference = Case["greedy_text"]!.GetValue<string>();
        const string stop = "little girl";
        JsonObject Body() => new() { ["prompt"] = Case["text"]!.GetValue<string>(), ["max_tokens"] = 64, ["temperature"] = 0, ["ignore_eos"] = true, ["stop"] = stop };
        var kept = Body();
        kept["include_stop_str_in_output"] = true;
        var choice = await Choice(kept);
        Assert.Equal(reference[..(reference.IndexOf(stop, StringComparison.Ordinal) + stop.Length)], choice["text"]!.GetValue<string>());
        Assert.Equal(reference[..reference.IndexOf(stop, StringComparison.Ordinal)], (await Choice(Body()))["text"]!.GetValue<string>());

        // bad_words: the reference text up to where " girl" came, and no " girl" after.
        var clean = Body();
        clean.Remove("stop");
        clean["bad_words"] = new JsonArray("girl");
        string cleaned = (await Choice(clean))["text"]!.GetValue<string>();
        Assert.StartsWith(reference[..reference.IndexOf(" girl", StringComparison.Ordinal)], cleaned);
        Assert.DoesNotContain(" girl", cleaned);

        // One allowed token: the completion is that token, again and again.
        var tokenizer = _server.Engine.Engine.Engine.Tokenizer!;
        int only = Fixtures.Ints(Case["greedy_ids"])[5];
        var allowed = new JsonObject { ["prompt"] = Case["text"]!.GetValue<string>(), ["max_tokens"] = 4, ["temperature"] = 1, ["seed"] = 2, ["allowed_token_ids"] = new JsonArray(only) };
        var prompt = _server.Engine.Engine.Engine.EncodePrompt(Case["text"]!.GetValue<string>());
        string expected = tokenizer.Decode([.. prompt, only, only, only, only])[tokenizer.Decode(prompt).Length..]; // in the prompt's context (SentencePiece spaces)
        Assert.Equal(expected, (await Choice(allowed))["text"]!.GetValue<string>());
        allowed["allowed_token_ids"] = new JsonArray();
        var (status, text) = await Post(allowed);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("allowed_token_ids", text);
    }

    [Fact]
    public async Task Truncate_prompt_tokens_runs_the_last_tokens_and_echo_returns_what_was_kept()
    {
        var c = Fixtures.Reference("stories260K")["cases"]!.AsArray().First(x => x!["name"]!.GetValue<string>() == "long_100")!;
        var ids = Fixtures.Ints(c["prompt_ids"]);
        var tail = ids[^20..];
        var tokenizer = _server.Engine.Engine.Engine.Tokenizer!;
        var truncated = JsonNode.Parse((await Post(new JsonObject
        {
            ["prompt"] = c["text"]!.GetValue<string>(), ["max_tokens"] = 10, ["temperature"] = 0, ["ignore_eos"] = true, ["truncate_prompt_tokens"] = 20, ["echo"] = true,
        })).Body)!;
        var alone = await Choice(new JsonObject { ["prompt"] = new JsonArray(tail.Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = 10, ["temperature"] = 0, ["ignore_eos"] = true });
        Assert.Equal(20, truncated["usage"]!["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(tokenizer.Decode(tail, skipSpecialTokens: false) + alone["text"]!.GetValue<string>(), truncated["choices"]![0]!["text"]!.GetValue<string>());
    }

    /// <summary>vLLM's stream_options.continuous_usage_stats: each chunk carries its choice's usage so far; without it, only the last chunk has usage.</summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public async Task Continuous_usage_stats_put_each_choices_running_usage_on_every_chunk(int n)
    {
        int prompt = Fixtures.Ints(Case["prompt_ids"]).Length;
        JsonObject Body(bool continuous) => new()
        {
            ["prompt"] = Case["text"]!.GetValue<string>(), ["max_tokens"] = 20, ["temperature"] = 1, ["seed"] = 3, ["ignore_eos"] = true, ["n"] = n,
            ["stream_options"] = new JsonObject { ["include_usage"] = true, ["continuous_usage_stats"] = continuous },
        };
        var (status, text) = await Post(WithStream(Body(true)));
        Assert.Equal(HttpStatusCode.OK, status);
        var chunks = Events(text);
        var choiceChunks = chunks.Where(c => c["choices"]!.AsArray().Count > 0).ToList();
        var seen = new long[n];
        foreach (var chunk in choiceChunks)
        {
            var usage = chunk["usage"]!;
            int index = chunk["choices"]![0]!["index"]!.GetValue<int>();
            long completion = usage["completion_tokens"]!.GetValue<long>();
            Assert.Equal(prompt, usage["prompt_tokens"]!.GetValue<int>());
            Assert.Equal(prompt + completion, usage["total_tokens"]!.GetValue<long>());
            Assert.True(completion >= seen[index], $"choice {index}: {completion} after {seen[index]}");
            seen[index] = completion;
        }
        Assert.All(seen, s => Assert.Equal(20, s));

        (status, text) = await Post(WithStream(Body(false)));
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.All(Events(text).Where(c => c["choices"]!.AsArray().Count > 0), c => Assert.Null(c["usage"]));
    }

    private static JsonObject WithStream(JsonObject body)
    {
        body["stream"] = true;
        return body;
    }

    private static List<JsonNode> Events(string text) => text.Split("\n\n", StringSplitOptions.RemoveEmptyEntries)
        .Where(e => e != "data: [DONE]").Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();

    [Fact]
    public async Task Prompt_logprobs_come_in_vllms_shape_and_are_refused_when_streaming_and_echo_must_be_a_boolean()
    {
        var prompt = Fixtures.Ints(Case["prompt_ids"]);
        JsonObject Body() => new() { ["prompt"] = Case["text"]!.GetValue<string>(), ["max_tokens"] = 1, ["temperature"] = 0, ["prompt_logprobs"] = 1 };
        var choice = await Choice(Body());
        var positions = choice["prompt_logprobs"]!.AsArray();
        Assert.Equal(prompt.Length, positions.Count);
        Assert.Null(positions[0]);
        // The same prompt scored through echo: the prompt token's entry holds the same log-probability.
        var echoed = (await Choice(new JsonObject { ["prompt"] = Case["text"]!.GetValue<string>(), ["max_tokens"] = 1, ["temperature"] = 0, ["logprobs"] = 1, ["echo"] = true }))["logprobs"]!["token_logprobs"]!.AsArray();
        for (int i = 1; i < prompt.Length; i++)
        {
            var entries = positions[i]!.AsObject();
            Assert.InRange(entries.Count, 1, 2); // the prompt's token, and the top one when it is another
            var own = entries[prompt[i].ToString()]!;
            Assert.Equal(echoed[i]!.GetValue<double>(), own["logprob"]!.GetValue<double>(), 5);
            Assert.True(own["rank"]!.GetValue<int>() >= 1);
            Assert.False(string.IsNullOrEmpty(own["decoded_token"]!.GetValue<string>()));
            Assert.Contains(entries, e => e.Value!["rank"]!.GetValue<int>() == 1);
        }

        var streamed = Body();
        streamed["stream"] = true;
        var (status, text) = await Post(streamed);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("prompt_logprobs", text);
        var badEcho = Body();
        badEcho.Remove("prompt_logprobs");
        badEcho["echo"] = "yes";
        (status, text) = await Post(badEcho);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("'echo' must be true or false", text);
        badEcho.Remove("echo");
        badEcho["allowed_token_ids"] = new JsonArray("one");
        (status, text) = await Post(badEcho);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Contains("'allowed_token_ids' must be an array of token ids", text);
        var engine = _server.Engine.Engine;
        await engine.WhenIdleAsync().WaitAsync(TimeSpan.FromMinutes(2));
        await engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }
}
