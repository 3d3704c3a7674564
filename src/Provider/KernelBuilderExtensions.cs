using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.SemanticKernel;
using Microsoft.SemanticKernel.ChatCompletion;

namespace LocalVllm;

/// <summary>Semantic Kernel registration: the local model as the kernel's chat completion service.</summary>
public static class KernelBuilderExtensions
{
    /// <summary>
    /// Registers the engine, its <see cref="IChatClient"/>
    /// and an <see cref="IChatCompletionService"/> over it, so <c>kernel.InvokePromptAsync</c> and chat-completion agents
    /// run on the local model.
    /// </summary>
    public static IKernelBuilder AddLocalVllmChatCompletion(this IKernelBuilder builder, Action<LocalVllmOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(builder);
        // Kernel function invocation: FunctionChoiceBehavior.Auto() then runs plugins when the model calls a tool.
        builder.Services.AddLocalVllm(configure).UseKernelFunctionInvocation();
        builder.Services.AddSingleton(sp => sp.GetRequiredService<IChatClient>().AsChatCompletionService(sp));
        return builder;
    }
}
