using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.SemanticKernel;
using Microsoft.SemanticKernel.ChatCompletion;

namespace LocalVllm.Tests;

/// <summary>Semantic Kernel's automatic function calling over the chat client (scripted model output at the seam).</summary>
public sealed class SemanticKernelFunctionCallingTests
{
    [Fact]
    public async Task Semantic_kernel_auto_function_calling_invokes_the_plugin_and_answers()
    {
        var engine = new ScriptedEngine(
            ["<tool_call>\n{\"name\": \"weather_get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"],
            ["It is sunny in Paris."]);
        var builder = Kernel.CreateBuilder();
        builder.Services.AddSingleton<IChatClient>(new ChatClientBuilder(new LocalVllmChatClient(engine)).UseKernelFunctionInvocation().Build());
        builder.Services.AddSingleton(sp => sp.GetRequiredService<IChatClient>().AsChatCompletionService(sp));
        int invoked = 0;
        builder.Plugins.AddFromFunctions("weather", [KernelFunctionFactory.CreateFromMethod((string city) => { invoked++; return $"sunny in {city}"; }, "get_weather")]);
        var kernel = builder.Build();
        var settings = new PromptExecutionSettings { FunctionChoiceBehavior = FunctionChoiceBehavior.Auto() };
        var result = await kernel.InvokePromptAsync("What is the weather in Paris?", new KernelArguments(settings));
        Assert.True(invoked == 1, $"invoked {invoked}; result: {result.GetValue<string>()}; prompt: {engine.Prompts[0]}");
        Assert.Equal("It is sunny in Paris.", result.GetValue<string>());
        Assert.Contains("weather_get_weather", engine.Prompts[0]);
        Assert.Contains("<tool_response>\nsunny in Paris\n</tool_response>", engine.Prompts[1]);
    }
}
