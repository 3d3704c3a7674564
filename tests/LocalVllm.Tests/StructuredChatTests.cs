using System.ComponentModel;
using System.Text.Json;
using Json.Schema;
using LocalVllm.Engine;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.SemanticKernel;
using Microsoft.SemanticKernel.ChatCompletion;
using FunctionCallContent = Microsoft.Extensions.AI.FunctionCallContent;
using FunctionResultContent = Microsoft.Extensions.AI.FunctionResultContent;

namespace LocalVllm.Tests;

public enum Sky { Clear, Cloudy, Rain }

public enum Compass { North, East, South, West }

public sealed record Wind([property: System.ComponentModel.DataAnnotations.Range(0, 200)] int Speed, Compass Direction);

public sealed record Forecast(Sky Sky, List<Compass> Route, Wind? Wind, bool Warning);

/// <summary>
/// Typed results and required tool calls on the tiny Qwen3 fixture (random weights, real tokenizer and template):
/// whatever the model would write, the constraint makes it a valid instance, checked by deserialising it and by an
/// independent validator (JsonSchema.Net) against the schema the call sent.
/// </summary>
public sealed class StructuredChatTests
{
    private static LocalVllmEngine NewEngine() =>
        new(new EngineOptions { Model = Fixtures.Model("tiny-qwen3-chat"), KvCacheMemoryBytes = 16L << 20 });

    private static ChatOptions Sampled(long seed) => new()
    {
        Temperature = 1,
        Seed = seed,
        MaxOutputTokens = 300,
        AdditionalProperties = new() { ["enable_thinking"] = false },
    };

    private static void AssertValid(JsonElement schema, string json)
    {
        var result = JsonSchema.FromText(schema.GetRawText()).Evaluate(JsonDocument.Parse(json).RootElement);
        Assert.True(result.IsValid, $"{json} is not valid under {schema.GetRawText()}");
    }

    [Fact]
    public async Task GetResponseAsync_of_a_record_returns_a_typed_result_the_schema_accepts()
    {
        using var engine = NewEngine();
        IChatClient client = new LocalVllmChatClient(engine);
        var schema = AIJsonUtilities.CreateJsonSchema(typeof(Forecast));
        for (int seed = 1; seed <= 3; seed++)
        {
            var response = await client.GetResponseAsync<Forecast>("What is the forecast?", Sampled(seed));
            Assert.True(ChatFinishReason.Stop == response.FinishReason, response.Text);
            var forecast = response.Result;
            Assert.NotNull(forecast.Route);
            Assert.True(Enum.IsDefined(forecast.Sky));
            if (forecast.Wind is { } wind) Assert.True(Enum.IsDefined(wind.Direction) && wind.Speed is >= 0 and <= 200);
            Assert.All(forecast.Route, c => Assert.True(Enum.IsDefined(c)));
            AssertValid(schema, response.Text);
        }
    }

    private static AIFunction[] Tools(Action<string> called) =>
    [
        AIFunctionFactory.Create([Description("Sets the sky for a day.")] (int day, Sky sky) => { called("set_sky"); return $"day {day}: {sky}"; }, "set_sky"),
        AIFunctionFactory.Create([Description("Turns the warning on or off.")] (bool on) => { called("toggle_warning"); return on ? "on" : "off"; }, "toggle_warning"),
    ];

    [Fact]
    public async Task RequireAny_makes_every_reply_well_formed_tool_calls_with_valid_arguments()
    {
        using var engine = NewEngine();
        IChatClient client = new LocalVllmChatClient(engine);
        var tools = Tools(_ => { });
        for (int seed = 1; seed <= 3; seed++)
        {
            var options = Sampled(seed);
            options.Tools = [.. tools];
            options.ToolMode = ChatToolMode.RequireAny;
            var response = await client.GetResponseAsync("Do something.", options);
            var calls = response.Messages.SelectMany(m => m.Contents).OfType<FunctionCallContent>().ToList();
            Assert.NotEmpty(calls);
            Assert.Empty(response.Text.Trim());
            Assert.Equal(ChatFinishReason.ToolCalls, response.FinishReason);
            AssertCallsValid(calls, tools);
        }
    }

    /// <summary>Every call names an offered tool, parsed, and has arguments its parameter schema accepts.</summary>
    private static void AssertCallsValid(IEnumerable<FunctionCallContent> calls, AIFunction[] tools)
    {
        foreach (var call in calls)
        {
            var tool = Assert.Single(tools, t => t.Name == call.Name);
            Assert.Null(call.Exception);
            AssertValid(tool.JsonSchema, JsonSerializer.Serialize(call.Arguments));
        }
    }

    [Fact]
    public async Task Auto_tool_mode_holds_any_call_the_model_opens_to_the_tools_schemas()
    {
        using var engine = NewEngine();
        IChatClient client = new LocalVllmChatClient(engine);
        var tools = Tools(_ => { });
        var options = Sampled(9);
        options.Tools = [.. tools];
        options.MaxOutputTokens = 60;
        var constraint = ChatRequestMapper.Constraint(options, "", engine.ChatTemplate.Source)!;
        Assert.Contains("%text_without(\"<tool_call>\")", constraint.Grammar);
        // The text before a call is free; once "<tool_call>" is written, only a valid call of an offered tool may follow.
        var constrained = StructuredOutputs.ForGrammar(constraint.Grammar!);
        var vocab = engine.Engine.Engine.Vocabulary!;
        var matcher = new LocalVllm.Engine.Structured.GrammarMatcher(LocalVllm.Engine.Structured.ConstraintCompiler.Compile(constrained), vocab);
        Assert.True(matcher.TryAdvance(System.Text.Encoding.UTF8.GetBytes("Sure. <tool_call>\n{\"name\": \"toggle_warning\", \"arguments\": {\"on\":true}}\n</tool_call>")));
        Assert.True(matcher.IsAccepting);
        Assert.False(matcher.Clone().TryAdvance(System.Text.Encoding.UTF8.GetBytes("<tool_call>\n{\"name\": \"nope\"")));
        for (int seed = 1; seed <= 3; seed++)
        {
            options.Seed = seed;
            var response = await client.GetResponseAsync("Do something.", options);
            AssertCallsValid(response.Messages.SelectMany(m => m.Contents).OfType<FunctionCallContent>(), tools);
        }
    }

    [Fact]
    public async Task RequireSpecific_calls_that_tool_and_the_invocation_middleware_runs_it()
    {
        using var engine = NewEngine();
        var invoked = new List<string>();
        IChatClient client = new ChatClientBuilder(new LocalVllmChatClient(engine)).UseFunctionInvocation().Build();
        var options = Sampled(5);
        options.Tools = [.. Tools(invoked.Add)];
        options.ToolMode = ChatToolMode.RequireSpecific("toggle_warning");
        options.MaxOutputTokens = 40;
        var response = await client.GetResponseAsync("Warn me.", options);
        Assert.NotEmpty(invoked);
        Assert.All(invoked, name => Assert.Equal("toggle_warning", name));
        var results = response.Messages.SelectMany(m => m.Contents).OfType<FunctionResultContent>().ToList();
        Assert.NotEmpty(results);
        Assert.All(results, r => Assert.Contains(r.Result?.ToString(), new[] { "on", "off" }));
        Assert.Throws<ArgumentException>(() =>
        {
            var bad = options.Clone();
            bad.ToolMode = ChatToolMode.RequireSpecific("no_such_tool");
            _ = new LocalVllmChatClient(engine).GetStreamingResponseAsync("x", bad);
        });
    }

    [Fact]
    public async Task Semantic_kernel_FunctionChoiceBehavior_Required_invokes_the_function()
    {
        using var engine = NewEngine();
        var builder = Kernel.CreateBuilder();
        builder.Services.AddSingleton<IChatClient>(new ChatClientBuilder(new LocalVllmChatClient(engine)).UseKernelFunctionInvocation().Build());
        builder.Services.AddSingleton(sp => sp.GetRequiredService<IChatClient>().AsChatCompletionService(sp));
        int invoked = 0;
        builder.Plugins.AddFromFunctions("lights", [KernelFunctionFactory.CreateFromMethod((bool on) => { invoked++; return on ? "lights on" : "lights off"; }, "switch")]);
        var kernel = builder.Build();
        var settings = new PromptExecutionSettings
        {
            FunctionChoiceBehavior = FunctionChoiceBehavior.Required(),
            ExtensionData = new Dictionary<string, object> { ["temperature"] = 1.0, ["seed"] = 3, ["max_tokens"] = 40, ["enable_thinking"] = false },
        };
        await kernel.InvokePromptAsync("Switch the lights.", new KernelArguments(settings));
        Assert.True(invoked >= 1, "the required function was not invoked");
    }

    [Fact]
    public void Constraint_starts_after_the_reasoning_when_the_prompt_leaves_thinking_open()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        var template = engine.ChatTemplate.Source;
        var format = new ChatOptions { ResponseFormat = ChatResponseFormat.Json };
        var thinkingOn = client.RenderPrompt([new ChatMessage(ChatRole.User, "Hi")], format).Text;
        Assert.Equal("</think>", ChatRequestMapper.Constraint(format, thinkingOn, template)!.ReasoningEnd);
        var off = format.Clone();
        off.AdditionalProperties = new() { ["enable_thinking"] = false };
        var thinkingOff = client.RenderPrompt([new ChatMessage(ChatRole.User, "Hi")], off).Text;
        var c = ChatRequestMapper.Constraint(off, thinkingOff, template)!;
        Assert.Null(c.ReasoningEnd);
        Assert.True(c.JsonObject);
        Assert.Null(ChatRequestMapper.Constraint(new ChatOptions(), thinkingOff, template));
    }
}
