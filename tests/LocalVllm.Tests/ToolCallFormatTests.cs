using System.Text.Json;
using LocalVllm.Engine;
using Microsoft.Extensions.AI;
using FunctionCallContent = Microsoft.Extensions.AI.FunctionCallContent;
using FunctionResultContent = Microsoft.Extensions.AI.FunctionResultContent;

namespace LocalVllm.Tests;

/// <summary>
/// Tool calls in the forms other than Hermes's: Llama 3's (vLLM's llama3_json: the reply is the call itself,
/// <c>{"name": ..., "parameters": {...}}</c>) and Mistral's (<c>[TOOL_CALLS]</c> and a JSON array). The format is read
/// from the real chat templates of the shared fixtures; end to end, the tiny Qwen3 fixture runs with Llama 3.2's and
/// Mistral Nemo's real templates (EngineOptions.ChatTemplate), so prompts, calls and results go through those templates
/// (Mistral's checks the call ids itself).
/// </summary>
public sealed class ToolCallFormatTests
{
    private static string Template(string file) => Path.Combine(Fixtures.Root, "tokenizers", "chat_templates", file);

    [Theory]
    [InlineData("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3_json")]
    [InlineData("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3_json")]
    [InlineData("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral")]
    [InlineData("Qwen-Qwen3.jinja", "hermes")]
    [InlineData("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes")]
    [InlineData("TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja", "hermes")]
    public void The_format_is_read_from_the_template(string file, string vllmParser) =>
        Assert.Equal(vllmParser, ToolCallFormats.VllmParser(ToolCallFormats.Of(File.ReadAllText(Template(file)))));

    private static List<OutputPiece> Parse(bool bare, params string[] deltas) => Parse(bare, ToolCallFormat.BareJson, deltas);

    private static List<OutputPiece> Parse(bool bare, ToolCallFormat format, params string[] deltas)
    {
        var parser = new ModelOutputParser(bare ? new HashSet<string> { "get_weather", "a", "b" } : null, format);
        var pieces = new List<OutputPiece>();
        foreach (var d in deltas) pieces.AddRange(parser.Feed(d));
        pieces.AddRange(parser.Finish());
        return pieces;
    }

    [Fact]
    public void A_bare_json_reply_is_read_as_its_calls_and_anything_else_as_text()
    {
        // One call, streamed in pieces, after leading white space: nothing leaks as text, one call at the end.
        var one = Parse(true, "\n ", "{\"name\": \"get_weather\", ", "\"parameters\": {\"city\": \"Paris; France\"}}");
        Assert.Equal([new ToolCallPiece("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris; France\"}}")], one);
        // Two calls separated by ';' (the separator inside a string is not one).
        var two = Parse(true, "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": [1, 2]}}");
        Assert.Equal([new ToolCallPiece("{\"name\": \"a\", \"parameters\": {}}"), new ToolCallPiece("{\"name\": \"b\", \"parameters\": {\"x\": [1, 2]}}")], two);
        // Text that does not start with '{' streams as text; JSON that names no offered tool (a JSON answer with a
        // "name"), or does not parse, is text.
        Assert.Equal("It is {sunny}.", string.Concat(Parse(true, "It is ", "{sunny}.").Cast<TextPiece>().Select(p => p.Text)));
        Assert.Equal([new TextPiece("{\"answer\": 42}")], Parse(true, "{\"answer\": 42}"));
        Assert.Equal([new TextPiece("{\"name\": \"Bob\", \"age\": 3}")], Parse(true, "{\"name\": \"Bob\", \"age\": 3}"));
        Assert.Equal([new TextPiece("{\"name\": \"a\", \"parameters\"")], Parse(true, "{\"name\": \"a\", \"parameters\""));
        // Without the format (no tools, or a Hermes model) a JSON reply is the answer's text.
        Assert.Equal("{\"name\": \"a\"}", string.Concat(Parse(false, "{\"name\": ", "\"a\"}").Cast<TextPiece>().Select(p => p.Text)));
    }

    [Fact]
    public void A_mistral_reply_of_a_call_array_is_read_as_its_calls_with_or_without_the_marker()
    {
        const string calls = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"a\", \"arguments\": {}}]";
        var expected = new OutputPiece[] { new ToolCallPiece("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"), new ToolCallPiece("{\"name\": \"a\", \"arguments\": {}}") };
        Assert.Equal(expected, Parse(true, ToolCallFormat.Mistral, calls[..20], calls[20..]));
        Assert.Equal(expected, Parse(true, ToolCallFormat.Mistral, "[TOOL_CALLS]", calls));
        Assert.Equal([new TextPiece("[1, 2]")], Parse(true, ToolCallFormat.Mistral, "[1, 2]"));
        Assert.Equal([new TextPiece("[{\"name\": \"Bob\"}]")], Parse(true, ToolCallFormat.Mistral, "[{\"name\": \"Bob\"}]"));
        Assert.Equal("Sunny [mostly].", string.Concat(Parse(true, ToolCallFormat.Mistral, "Sunny ", "[mostly].").Cast<TextPiece>().Select(p => p.Text)));
    }

    private static LocalVllmEngine LlamaTemplatedEngine() => TemplatedEngine("meta-llama-Llama-3.2-3B-Instruct.jinja");

    private static LocalVllmEngine TemplatedEngine(string template) => new(new EngineOptions
    {
        Model = Fixtures.Model("tiny-qwen3-chat"), KvCacheMemoryBytes = 16L << 20, ChatTemplate = Template(template),
    });

    [Fact]
    public async Task A_required_mistral_call_gets_a_nine_character_id_and_the_template_renders_the_round_trip()
    {
        using var engine = TemplatedEngine("mistralai-Mistral-Nemo-Instruct-2407.jinja");
        var invoked = new List<bool>();
        var tool = AIFunctionFactory.Create((bool on) => { invoked.Add(on); return on ? "warning on" : "warning off"; }, "toggle_warning", "Turns the warning on or off.");
        var options = new ChatOptions { Temperature = 1, Seed = 2, MaxOutputTokens = 40, Tools = [tool], ToolMode = ChatToolMode.RequireSpecific("toggle_warning") };
        var constraint = ChatRequestMapper.Constraint(options, "", engine.ChatTemplate.Source)!;
        Assert.StartsWith("root ::= \"[\" call", constraint.Grammar);

        var plain = new LocalVllmChatClient(engine);
        IChatClient client = new ChatClientBuilder(plain).UseFunctionInvocation(configure: f => f.MaximumIterationsPerRequest = 1).Build();
        var history = new List<ChatMessage> { new(ChatRole.User, "Warn me.") };
        var response = await client.GetResponseAsync(history, options);
        Assert.NotEmpty(invoked);
        var call = response.Messages.SelectMany(m => m.Contents).OfType<FunctionCallContent>().First();
        Assert.Matches("^[0-9a-f]{9}$", call.CallId);
        var result = response.Messages.SelectMany(m => m.Contents).OfType<FunctionResultContent>().First();
        // Mistral's template raises an error for an id that is not nine letters and digits; this render is the check.
        var (prompt, _) = plain.RenderPrompt([.. history, .. response.Messages.Where(m => m.Contents.Any(c => c is FunctionCallContent or FunctionResultContent))], options);
        Assert.Contains($"[TOOL_CALLS][{{\"name\": \"toggle_warning\"", prompt);
        // (The template writes the result's text as it is: JSON results stay JSON, as in transformers' render of it.)
        Assert.True(prompt.Contains($"[TOOL_RESULTS]{{\"content\": {result.Result}, \"call_id\": \"{call.CallId}\"}}[/TOOL_RESULTS]"), prompt[^300..]);
    }

    [Fact]
    public async Task A_required_call_is_written_in_llama_form_parsed_invoked_and_its_result_rendered_for_the_model()
    {
        using var engine = LlamaTemplatedEngine();
        var invoked = new List<bool>();
        var tool = AIFunctionFactory.Create((bool on) => { invoked.Add(on); return on ? "warning on" : "warning off"; }, "toggle_warning", "Turns the warning on or off.");
        var options = new ChatOptions
        {
            Temperature = 1, Seed = 4, MaxOutputTokens = 40, Tools = [tool], ToolMode = ChatToolMode.RequireSpecific("toggle_warning"),
        };
        var constraint = ChatRequestMapper.Constraint(options, "", engine.ChatTemplate.Source)!;
        Assert.Contains("\\\"parameters\\\": ", constraint.Grammar);
        Assert.DoesNotContain("<tool_call>", constraint.Grammar);

        // The reply under the constraint is a bare call; the chat client returns it as a call with valid arguments.
        var plain = new LocalVllmChatClient(engine);
        var reply = await plain.GetResponseAsync("Warn me.", options);
        var call = Assert.Single(reply.Messages.SelectMany(m => m.Contents).OfType<FunctionCallContent>());
        Assert.Equal("toggle_warning", call.Name);
        Assert.Null(call.Exception);
        Assert.IsType<bool>(((JsonElement)call.Arguments!["on"]!).Deserialize<bool>());
        Assert.Equal(ChatFinishReason.ToolCalls, reply.FinishReason);
        Assert.DoesNotContain(reply.Messages.SelectMany(m => m.Contents).OfType<TextContent>(), t => t.Text.Trim().Length > 0);

        // Through the invocation middleware: the tool runs, and the next prompt carries its result in Llama's ipython turn.
        IChatClient client = new ChatClientBuilder(plain).UseFunctionInvocation(configure: f => f.MaximumIterationsPerRequest = 1).Build();
        var history = new List<ChatMessage> { new(ChatRole.User, "Warn me.") };
        var response = await client.GetResponseAsync(history, options);
        Assert.NotEmpty(invoked);
        var result = response.Messages.SelectMany(m => m.Contents).OfType<FunctionResultContent>().First();
        var (prompt, _) = plain.RenderPrompt([.. history, .. response.Messages.Where(m => m.Contents.Any(c => c is FunctionCallContent or FunctionResultContent))], options);
        Assert.Contains("<|start_header_id|>ipython<|end_header_id|>", prompt);
        Assert.Contains(result.Result!.ToString()!, prompt);
        Assert.Contains("\"name\": \"toggle_warning\"", prompt);
    }

    /// <summary>
    /// Auto mode in the tagless forms: the reply is either calls of offered tools with valid arguments, or text whose
    /// first character cannot begin a call; checked on the grammar directly and on sampled replies.
    /// </summary>
    [Theory]
    [InlineData("meta-llama-Llama-3.2-3B-Instruct.jinja", "{\"name\": \"toggle_warning\", \"parameters\": {\"on\":true}}", "{\"name\": \"nope\"")]
    [InlineData("mistralai-Mistral-Nemo-Instruct-2407.jinja", "[{\"name\": \"toggle_warning\", \"arguments\": {\"on\":false}}]", "[1")]
    public async Task Auto_mode_replies_are_valid_calls_or_text_that_cannot_be_taken_for_one(string template, string validCall, string invalidStart)
    {
        using var engine = TemplatedEngine(template);
        var tool = AIFunctionFactory.Create((bool on) => on ? "warning on" : "warning off", "toggle_warning", "Turns the warning on or off.");
        var options = new ChatOptions { Temperature = 1, MaxOutputTokens = 40, Tools = [tool] };
        var constraint = ChatRequestMapper.Constraint(options, "", engine.ChatTemplate.Source)!;
        var vocab = engine.Engine.Engine.Vocabulary!;
        LocalVllm.Engine.Structured.GrammarMatcher Matcher() =>
            new(LocalVllm.Engine.Structured.ConstraintCompiler.Compile(StructuredOutputs.ForGrammar(constraint.Grammar!)), vocab);
        static byte[] Utf8(string text) => System.Text.Encoding.UTF8.GetBytes(text);
        var call = Matcher();
        Assert.True(call.TryAdvance(Utf8(validCall)) && call.IsAccepting);
        var text = Matcher();
        Assert.True(text.TryAdvance(Utf8("Sure: the warning {is} on [now].")) && text.IsAccepting);
        Assert.False(Matcher().TryAdvance(Utf8(invalidStart)));
        Assert.False(Matcher().TryAdvance(Utf8(" " + validCall[0])));

        var client = new LocalVllmChatClient(engine);
        for (int seed = 1; seed <= 3; seed++)
        {
            options.Seed = seed;
            var reply = await client.GetResponseAsync("Warn me, or tell me a story.", options);
            var calls = reply.Messages.SelectMany(m => m.Contents).OfType<FunctionCallContent>().ToList();
            Assert.All(calls, c => Assert.True(c.Name == "toggle_warning" && c.Exception is null && c.Arguments!.ContainsKey("on"), $"seed {seed}: {c.Name}"));
            if (calls.Count == 0) Assert.False(reply.Text.StartsWith(validCall[0]), $"seed {seed}: a reply that looks like a call came back as text: {reply.Text}");
        }
    }
}
