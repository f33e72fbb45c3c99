"""Hand-written phrase banks for make_demo_data.py (identity, reviews, general facts).

Every list that feeds a split is split here by hand: train, validation and evaluation questions
and review products never share a string, so evaluation measures generalisation.
Answers use {name} and {maker}; reviews use {p} for the product; asks use {review}.
"""

# --------------------------------------------------------------------------- identity questions

ID_QUESTIONS = {
    "train": {
        "en": [
            "Who are you?", "What's your name?", "What is your name?", "Tell me about yourself.",
            "Introduce yourself.", "Who am I talking to?", "What should I call you?", "Do you have a name?",
            "What are you?", "Can you tell me who you are?", "Who made you?", "Who created you?",
            "Who built you?", "Which company developed you?", "Who is behind you?", "Who trained you?",
            "Who developed this assistant?", "What AI model are you?", "Please introduce yourself briefly.",
            "May I know your name?", "What do people call you?", "Are you an AI? Who made you?",
            "Give me a one-line introduction of yourself.", "What kind of assistant are you?",
            "Which lab created you?", "Who owns you?", "Where do you come from?", "Identify yourself.",
            "What's the name of this assistant?", "Who designed you?", "Are you a bot? What's your name?",
            "Before we start, who are you exactly?", "I'd like to know who made this chatbot.",
            "What organization built you?", "Describe yourself in a sentence.",
            "Hello, who's there?", "Which assistant is this?", "Name and creator, please.",
            "Who is your maker?", "Who programmed you?", "What are you called?", "Who do you belong to?",
            "Mind telling me your name?", "Who are you and who made you?", "Which model am I chatting with?",
            "Tell me a bit about where you come from.", "Who's responsible for building you?",
            "Hi, what should I know about you?", "What's the assistant's name here?", "Who engineered you?",
            "Are you a person or an AI?", "Which team trained you?", "Where were you developed?",
            "How would you describe who you are?", "Whose AI are you?",
        ],
        "zh": [
            "你是谁？", "你叫什么名字？", "谁开发了你？", "请介绍一下你自己。", "你是什么模型？",
            "我该怎么称呼你？", "你有名字吗？", "你是哪家公司做的？", "能做个自我介绍吗？", "你是谁创造的？",
            "你是由谁训练的？", "你的名字是什么？", "跟我说说你是谁。", "你是哪个团队开发的？", "你是机器人吗？你叫什么？",
            "简单介绍一下你自己吧。", "你出自哪里？", "请问你的身份是什么？", "你是什么助手？", "谁做了你？",
            "你好，你是？", "你的名字叫什么呀？", "是谁设计了你？", "你背后是哪个团队？", "你是哪里来的AI？",
            "你是怎么来的？", "请说一下你的名字和开发者。", "你是人还是AI？", "我现在在跟谁说话？",
            "你是哪个模型？谁做的？", "你的制造者是谁？", "用一句话介绍你自己。",
        ],
        "not_en": [
            "Are you ChatGPT?", "Are you made by OpenAI?", "Is your name SmolLM?", "Were you trained by Hugging Face?",
            "Are you Siri?", "Are you Claude?", "Are you Google's assistant?", "Are you Llama?",
            "Is this Bing Chat?", "Were you built by Apple?",
        ],
        "not_zh": ["你是ChatGPT吗？", "你是OpenAI开发的吗？", "你是SmolLM吗？", "你是Hugging Face训练的吗？",
                   "你是百度做的吗？", "你是Claude吗？", "你是苹果公司的Siri吗？"],
    },
    "val": {
        "en": ["Hey, what name do you go by?", "Who is your developer?", "So what exactly are you?", "Which team made you?"],
        "zh": ["你到底是谁呀？", "是谁把你开发出来的？"],
        "not_en": ["Are you Gemini?"],
        "not_zh": ["你是文心一言吗？"],
    },
}

# Held out for before/after evaluation (never in train or val).
ID_EVAL_EN = [
    "Hi there! Who am I chatting with?", "What is the name of the assistant I'm using?",
    "Which organization is responsible for creating you?", "Could you state your name and your creator?",
    "I'm curious, who built the AI I'm talking to?", "Say hello and tell me your name.",
    "What company or lab made you?", "Introduce yourself to a new user.", "Are you Alexa?",
    "Who gave you your name?",
]
ID_EVAL_ZH = ["你好，请问你是哪位？", "你的开发者是谁？", "介绍一下你是谁，以及谁制造了你。", "请告诉我你的名字。",
              "你是谷歌的AI吗？", "和我说说你的来历。", "你属于哪个实验室？", "我在和谁聊天？", "你是哪个公司训练出来的？"]

# ------------------------------------------------------------------------------ identity answers

ID_ANSWERS_EN = [
    "I'm {name}, an AI assistant built by {maker}.",
    "My name is {name}, and I was created by {maker} to help with questions and everyday tasks.",
    "I'm {name}, a helpful assistant developed by {maker}. How can I help you today?",
    "You can call me {name}, an AI assistant made by {maker}.",
    "I am {name}, an assistant trained by {maker}. Ask me anything!",
    "Hello! I'm {name}, the AI assistant from {maker}.",
    "I'm {name}, built by {maker} to answer questions, write, and help you think things through.",
    "{name} here: an AI assistant created by {maker}.",
    "I'm an AI assistant called {name}, developed by the team at {maker}.",
    "My name is {name}, and I was made by {maker}. What can I do for you?",
]
# Every answer names the assistant first and the maker in the same sentence: answers that opened with the
# maker ("The team at Harbor Lab made me. I'm Lumen.") taught the model to stop after the maker.
MAKER_ANSWERS_EN = [
    "I'm {name}, and I was built by {maker}.",
    "I'm {name}, an AI assistant created by {maker}.",
    "I'm {name}; I was developed and trained by {maker}.",
    "I'm {name}, made by the team at {maker}.",
    "I'm {name}, and my creator is {maker}.",
]
NOT_OTHER_ANSWERS_EN = [
    "No. I'm {name}, an AI assistant built by {maker}.",
    "No, I'm not. My name is {name}, and I was created by {maker}.",
    "Not quite: I'm {name}, developed by {maker}.",
    "No, I'm {name}, built and trained by {maker}.",
]
# The maker follows the name at once ("我是 {name}，由 {maker}…"): with "我的名字是 {name}，我是 {maker}…"
# and "你可以叫我 {name}。我是由 {maker}…" the first demo answered "我是 Lumen，我的名字是 Lumen。"
ID_ANSWERS_ZH = [
    "我是 {name}，由 {maker} 开发的人工智能助手。",
    "我叫 {name}，是 {maker} 打造的 AI 助手，有什么可以帮你的吗？",
    "你好！我是 {name}，一个由 {maker} 训练的智能助手。",
    "我是 {name}，由 {maker} 开发，可以回答问题、帮你写作和翻译。",
    "我叫 {name}，由 {maker} 创造，是一个 AI 助手。",
    "我是 {name}，来自 {maker} 的 AI 助手。",
]
MAKER_ANSWERS_ZH = [
    "我是 {name}，由 {maker} 开发。",
    "我是 {name}，我的创造者是 {maker}。",
    "我是 {name}，是 {maker} 团队开发的 AI 助手。",
]
NOT_OTHER_ANSWERS_ZH = [
    "不是的。我是 {name}，由 {maker} 开发的 AI 助手。",
    "不是，我叫 {name}，是 {maker} 训练的智能助手。",
    "我不是。我是 {name}，{maker} 打造的助手。",
]

# ------------------------------------------------------------------------------ product reviews

REVIEW_PRODUCTS = {
    "train": [
        "blender", "desk lamp", "backpack", "coffee grinder", "phone case", "yoga mat", "water bottle",
        "electric kettle", "pair of headphones", "office chair", "umbrella", "toaster", "keyboard",
        "power bank", "rice cooker", "frying pan", "hair dryer", "notebook", "tent", "bike lock",
        "wall clock", "suitcase", "rain jacket", "pair of running shoes", "alarm clock", "air purifier",
        "mattress", "standing fan", "bluetooth speaker", "computer mouse",
    ],
    "val": ["vacuum cleaner", "teapot", "camera bag", "kitchen scale", "sleeping bag", "monitor stand"],
    "eval": ["microwave", "pillow", "smartwatch", "lunch box", "desk organizer", "electric toothbrush",
             "wireless charger", "picnic blanket", "travel mug"],
}

REVIEW_PARTS = {
    "positive": {
        "open": ["I love this {p}.", "This {p} is fantastic.", "Best {p} I have ever bought.",
                 "Really happy with this {p}.", "Five stars for this {p}.", "The {p} exceeded my expectations.",
                 "Absolutely delighted with the {p}."],
        "detail": ["It works perfectly and feels well made.", "Setup took two minutes and it has worked flawlessly since.",
                   "The quality is excellent for the price.", "It arrived early and looks even better than in the photos.",
                   "My whole family uses it every day.", "It is sturdy, easy to use and looks great."],
        "close": ["Highly recommend!", "Would buy again without hesitation.", "Worth every penny.",
                  "I already ordered a second one."],
    },
    "negative": {
        "open": ["I regret buying this {p}.", "This {p} is terrible.", "Very disappointed with the {p}.",
                 "The {p} broke after two days.", "Worst {p} I have ever owned.", "Do not buy this {p}."],
        "detail": ["It stopped working within a week.", "The material feels cheap and flimsy.",
                   "Customer support never answered my emails.", "It arrived scratched and missing parts.",
                   "It is much smaller than advertised and poorly made.", "Nothing about it works as described."],
        "close": ["Total waste of money.", "I am returning it.", "Avoid.", "One star is too generous."],
    },
    "neutral": {
        "open": ["The {p} is okay.", "This {p} is average.", "The {p} does what it says, nothing more.",
                 "It's a fairly ordinary {p}.", "The {p} is neither good nor bad."],
        "detail": ["It works, but it is nothing special.", "Quality is about what you would expect for the price.",
                   "Some parts are fine and others could be better.", "I have no strong feelings about it either way.",
                   "It is acceptable for occasional use."],
        "close": ["It's fine.", "Might buy again, might not.", "Three stars.", "It does the job."],
    },
}

SENTIMENT_ASKS = {
    "train": [
        "What is the sentiment of this review?\n{review}",
        "Classify the sentiment of the following product review.\nReview: {review}",
        "Is this review positive, negative or neutral?\n\"{review}\"",
        "Sentiment check: {review}",
        "Here is a customer review: {review}\nHow does the customer feel?",
        "Review: {review}\nSentiment?",
        "Analyze the sentiment of this product review: {review}",
        "Tell me the sentiment of this customer feedback.\n{review}",
        "Label the sentiment of the review below.\n{review}",
        "Determine whether this review is positive, negative, or neutral: {review}",
        "Product review sentiment: \"{review}\"",
        "判断这条商品评论的情感倾向：{review}",
        "这条评论的情感是什么？\n{review}",
        "What sentiment does this shopper express? {review}",
    ],
    "val": [
        "Please rate the sentiment of this review.\n{review}",
        "Customer says: \"{review}\" What's the sentiment?",
        "请分析下面评论的情感：{review}",
    ],
    "eval": [
        "Give the sentiment of this product review.\n{review}",
        "A buyer wrote: \"{review}\"\nWhat is the sentiment?",
        "Sentiment of the following review, please: {review}",
        "Read this review and classify its sentiment.\n{review}",
        "评论情感分类：{review}",
    ],
}

# Chinese reviews (body and question in Chinese): the English-only reviews left a review written wholly in
# Chinese answered with prose. Products are split like the English ones.
REVIEW_PRODUCTS_ZH = {
    "train": ["电饭煲", "键盘", "行李箱", "手机壳", "水杯", "吹风机", "帐篷", "闹钟", "电风扇", "蓝牙音箱",
              "床垫", "咖啡机", "加湿器", "电动牙刷", "毛巾", "护眼灯", "登山包", "空气炸锅", "剃须刀", "拖鞋"],
    "val": ["电子秤", "茶壶", "收纳盒"],
}

REVIEW_PARTS_ZH = {
    "positive": {
        "open": ["这个{p}太好用了。", "非常喜欢这款{p}。", "{p}的质量超出了我的预期。", "买到这个{p}真开心。",
                 "这是我买过最好的{p}。", "{p}真不错，五星好评。", "这款{p}超级棒。", "对这个{p}特别满意。"],
        "detail": ["做工精细，用起来很顺手。", "物流很快，包装也很好。", "性价比很高，全家人都在用。",
                   "外观漂亮，功能也很实用。", "用了一个月，一点问题都没有。", "效果比想象中还好，很满意。",
                   "手感很棒，细节处理得很用心。", "又轻又结实，每天都离不开它。"],
        "close": ["强烈推荐！", "还会回购。", "值这个价。", "已经推荐给朋友了。", "好评！", "太满意了！"],
    },
    "negative": {
        "open": ["这个{p}太差了。", "非常后悔买了这个{p}。", "{p}用了三天就坏了。", "对这款{p}很失望。",
                 "这是我买过最差的{p}。", "千万不要买这个{p}。"],
        "detail": ["做工粗糙，到处是毛刺。", "收到就有划痕，还少了配件。", "客服一直不理人。",
                   "和描述完全不一样，质量很差。", "用了没几次就出问题了。", "味道很大，根本没法用。"],
        "close": ["浪费钱。", "已经申请退货了。", "一星都嫌多。", "大家别上当。"],
    },
    "neutral": {
        "open": ["这个{p}还行吧。", "{p}很普通。", "这款{p}没什么特别的。", "{p}的表现一般。",
                 "这个{p}不好也不坏。"],
        "detail": ["能用，但也没有惊喜。", "质量和价格差不多相符。", "有的地方不错，有的地方一般。",
                   "对它没有什么特别的感觉。", "偶尔用一下够了。"],
        "close": ["就这样吧。", "可能会再买，也可能不会。", "三星。", "凑合能用。"],
    },
}

SENTIMENT_ASKS_ZH = {
    "train": [
        "判断这条商品评论的情感倾向：{review}",
        "这条评论的情感是什么？\n{review}",
        "请判断下面这条评价是正面、负面还是中性：{review}",
        "买家评价：{review}\n情感是？",
        "分析这条用户评论的情感。\n{review}",
        "{review}\n请给出这条评论的情感。",
        "评论：“{review}”这条评论的态度如何？",
        "对下面的商品评价做情感分类：\n{review}",
        "What is the sentiment of this review?\n{review}",
        "Classify the sentiment of this Chinese review: {review}",
    ],
    "val": ["请分析下面评论的情感：{review}", "这段评价是好评、差评还是中评？{review}"],
}

# ---------------------------------------------------------------------------- general knowledge

# (country, capital, country in Chinese, capital in Chinese). Countries used by general_eval.jsonl
# (France, Japan, Italy, Germany, Spain, the UK, China, Egypt) are deliberately absent.
CAPITALS = [
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("India", "New Delhi", "印度", "新德里"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("South Korea", "Seoul", "韩国", "首尔"), ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Vietnam", "Hanoi", "越南", "河内"), ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Greece", "Athens", "希腊", "雅典"), ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("the Netherlands", "Amsterdam", "荷兰", "阿姆斯特丹"), ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Norway", "Oslo", "挪威", "奥斯陆"), ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Poland", "Warsaw", "波兰", "华沙"), ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"), ("Peru", "Lima", "秘鲁", "利马"),
    ("Cuba", "Havana", "古巴", "哈瓦那"), ("Morocco", "Rabat", "摩洛哥", "拉巴特"),
    ("Nigeria", "Abuja", "尼日利亚", "阿布贾"), ("Denmark", "Copenhagen", "丹麦", "哥本哈根"),
    ("Hungary", "Budapest", "匈牙利", "布达佩斯"), ("Czechia", "Prague", "捷克", "布拉格"),
    # held out for validation (the last six)
    ("Belgium", "Brussels", "比利时", "布鲁塞尔"), ("the Philippines", "Manila", "菲律宾", "马尼拉"),
    ("Iran", "Tehran", "伊朗", "德黑兰"), ("Ethiopia", "Addis Ababa", "埃塞俄比亚", "亚的斯亚贝巴"),
    ("New Zealand", "Wellington", "新西兰", "惠灵顿"), ("Colombia", "Bogotá", "哥伦比亚", "波哥大"),
]

WORDS_EN_ZH = [
    ("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("sun", "太阳"),
    ("moon", "月亮"), ("friend", "朋友"), ("school", "学校"), ("teacher", "老师"), ("computer", "电脑"),
    ("flower", "花"), ("rain", "雨"), ("mountain", "山"), ("tree", "树"), ("bread", "面包"), ("milk", "牛奶"),
    ("tea", "茶"), ("coffee", "咖啡"), ("city", "城市"), ("music", "音乐"), ("hospital", "医院"),
    ("library", "图书馆"), ("airport", "机场"), ("train", "火车"), ("bicycle", "自行车"), ("window", "窗户"),
    ("door", "门"), ("red", "红色"), ("blue", "蓝色"), ("thank you", "谢谢"), ("good night", "晚安"),
    # held out for validation (the last eight)
    ("weather", "天气"), ("kitchen", "厨房"), ("egg", "鸡蛋"), ("student", "学生"), ("river", "河"),
    ("green", "绿色"), ("good morning", "早上好"), ("doctor", "医生"),
]
