"""Write the sample SFT data used by the demo and the tests.

Every sentence below was written for mps-shim; nothing is copied from another data set.
The records follow the upstream Chinese-LLaMA-Alpaca-3 SFT format: a JSON array of
{"instruction", "input", "output"} objects.

The output is deterministic, so the JSON files in the tree can always be regenerated:

    python examples/data/make_sample_data.py

writes examples/data/sft/*.json (training, read by --dataset_dir) and
examples/data/validation.json (read by --validation_file). The validation file lives
outside sft/ on purpose: upstream globs every *.json in dataset_dir, so a validation
file placed there would also be trained on.
"""

import argparse
import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SEED = 3  # any fixed value; it only decides numbers in the arithmetic records and the shuffle

# ---------------------------------------------------------------------------
# Hand-written fragments, one list per kind of instruction.
# ---------------------------------------------------------------------------

KNOWLEDGE_QA = [
    ("为什么天空是蓝色的？", "阳光进入大气层后会被空气分子散射，波长较短的蓝光散射得最强，所以我们从各个方向看到的天空都是蓝色的。"),
    ("一年有几个季节？", "一年通常分为春、夏、秋、冬四个季节。"),
    ("水在多少度时沸腾？", "在一个标准大气压下，水在摄氏一百度时沸腾。海拔越高，气压越低，沸点也会随之降低。"),
    ("什么是光合作用？", "光合作用是绿色植物利用阳光的能量，把二氧化碳和水转化为葡萄糖并释放氧气的过程。它为地球上大多数生命提供了能量和氧气。"),
    ("月亮为什么会有圆缺变化？", "月亮本身不发光，我们看到的是它反射的太阳光。月亮绕地球运行时，被照亮的那一面朝向地球的部分不断变化，于是就出现了新月、上弦月、满月和下弦月。"),
    ("熊猫主要吃什么？", "大熊猫主要吃竹子，包括竹叶、竹竿和竹笋，偶尔也会吃一些小动物或水果。"),
    ("长城有什么历史意义？", "长城是中国古代为了抵御北方游牧民族而修建的防御工程，前后修筑了两千多年。它见证了古代的军事、交通和民族交往，如今是世界文化遗产。"),
    ("人为什么需要睡觉？", "睡眠能让大脑整理白天的记忆、清除代谢废物，也让身体修复组织、调节激素。长期睡眠不足会影响注意力、情绪和免疫力。"),
    ("什么是分数？", "分数表示把一个整体平均分成若干份后取其中的几份，例如四分之三表示把整体分成四份，取其中三份。"),
    ("地球绕太阳转一圈需要多长时间？", "大约三百六十五天又六小时，这就是一年。多出来的时间每四年累积成一天，所以有闰年。"),
    ("茶叶有哪些常见种类？", "常见的茶叶有绿茶、红茶、乌龙茶、白茶、黄茶和黑茶，它们的区别主要在于发酵程度和制作工艺。"),
    ("为什么要多喝水？", "水参与身体几乎所有的代谢过程，能帮助调节体温、运输营养和排出废物。缺水时人会感到疲劳、头痛，注意力下降。"),
    ("什么是成语？", "成语是汉语中长期沿用、结构固定的短语，大多由四个字组成，往往带有典故，例如“画蛇添足”“守株待兔”。"),
    ("蜜蜂是怎样酿蜜的？", "蜜蜂采集花蜜后存放在蜜囊里，回到蜂巢再把花蜜吐给其他工蜂。工蜂反复吞吐，加入酶，并扇动翅膀蒸发水分，花蜜逐渐变浓，就成了蜂蜜。"),
    ("“温故而知新”是什么意思？", "意思是温习已经学过的知识，能从中得到新的理解和体会。这句话出自《论语》。"),
    ("电脑的内存和硬盘有什么区别？", "内存用于临时存放正在运行的程序和数据，速度快但断电后内容会消失；硬盘用于长期保存文件，容量大但速度较慢。"),
    ("为什么秋天树叶会变黄？", "秋天气温下降、日照变短，叶子里的叶绿素逐渐分解，原本被掩盖的叶黄素和胡萝卜素显现出来，叶子就变成了黄色或橙色。"),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("什么是二十四节气？", "二十四节气是中国古人根据太阳在黄道上的位置划分的时间节点，用来指导农事，例如立春、清明、夏至、秋分和冬至。二零一六年它被列入人类非物质文化遗产名录。"),
    ("雨是怎么形成的？", "地面的水受热蒸发成水蒸气，上升到高空遇冷凝结成小水滴，小水滴聚集成云。当水滴变大变重，空气托不住时，就落下来形成雨。"),
    ("跑步前为什么要热身？", "热身能提高肌肉温度和关节灵活性，让心率逐步上升，从而减少拉伤和扭伤的风险，也能让正式运动时表现更好。"),
    ("什么是机器学习？", "机器学习是让计算机从数据中自动发现规律的方法。我们不直接写出规则，而是给它大量例子，让模型自己调整参数，以便对新数据做出判断或预测。"),
    ("筷子是什么时候出现的？", "考古发现表明，中国人使用筷子至少已有三千多年的历史，最早的筷子多用竹子或木头制成。"),
    ("骆驼为什么能在沙漠中长时间不喝水？", "骆驼的驼峰储存的是脂肪，分解时可以产生能量和一部分水；它的血液和肾脏也能很好地保存水分，所以能在沙漠里坚持较长时间不喝水。"),
    ("什么是比喻？", "比喻是一种修辞手法，用一种事物来描写另一种有相似之处的事物，例如“月亮像一只小船”。"),
    ("为什么船能浮在水面上？", "船排开的水产生向上的浮力。只要船排开的水的重量等于船自身的重量，船就能浮在水面上，这就是阿基米德原理。"),
    ("书法有哪些主要字体？", "汉字书法的主要字体有篆书、隶书、楷书、行书和草书。"),
    ("怎样判断一个数能否被三整除？", "把这个数各位上的数字加起来，如果和能被三整除，这个数就能被三整除。例如一百二十三，一加二加三等于六，所以它能被三整除。"),
    ("什么是火山？", "火山是地下高温的岩浆沿着地壳裂缝喷出地表形成的山体。喷发时会释放熔岩、火山灰和气体。"),
    ("饺子通常在什么节日吃？", "在中国北方，春节吃饺子是重要的传统，尤其是除夕夜守岁时，寓意辞旧迎新。"),
    ("为什么冬天呼出的气是白色的？", "人呼出的气体里含有水蒸气，冬天外面很冷，水蒸气一遇冷就凝结成许多小水珠，看起来就像一团白雾。"),
    ("什么是互联网？", "互联网是把全世界的计算机网络连接在一起形成的巨大网络，人们可以通过它浏览网页、收发邮件、观看视频和交流信息。"),
    ("鱼在水里怎么呼吸？", "鱼用鳃呼吸。水流过鳃时，鳃丝里的毛细血管吸收水中溶解的氧气，同时排出二氧化碳。"),
    ("“三人行，必有我师”告诉我们什么道理？", "这句话告诉我们要虚心向别人学习，每个人身上都有值得学习的长处。"),
    ("纸是谁发明的？", "东汉时期的蔡伦改进了造纸术，用树皮、麻头、破布和旧渔网造出了质量更好、成本更低的纸，推动了纸的普及。"),
    ("为什么要垃圾分类？", "垃圾分类能让可回收物重新利用，减少填埋和焚烧带来的污染，也能让有害垃圾得到安全处理，节约资源、保护环境。"),
    ("什么是质数？", "质数是大于一的自然数中，除了一和它本身以外没有其他因数的数，例如二、三、五、七、十一。"),
    ("彩虹是怎样形成的？", "雨后空气中有许多小水滴，阳光照进水滴时发生折射和反射，不同颜色的光折射角度不同，于是被分开，形成了彩虹。"),
    ("京剧的脸谱颜色代表什么？", "京剧脸谱的颜色常用来表现人物性格：红色多表示忠勇，黑色表示刚直，白色常表示奸诈，蓝色表示勇猛。"),
    ("如何保护视力？", "看书和用电子屏幕时保持适当距离，每隔一段时间远眺休息；保证充足睡眠，多到户外活动；光线要充足柔和，不要在晃动的车上看书。"),
    ("地震时应该怎么做？", "在室内时，应迅速躲到坚固的桌子下或承重墙的墙角，护住头部；不要乘电梯，也不要跳楼。在室外时，要远离建筑物、电线杆和广告牌，到空旷的地方避险。"),
    ("什么是汇率？", "汇率是一种货币兑换另一种货币的比率，比如用多少人民币可以换一美元。它会随着经济形势和市场供求而变化。"),
    ("太阳系有几颗行星？", "太阳系有八颗行星，按离太阳由近到远依次是水星、金星、地球、火星、木星、土星、天王星和海王星。"),
    ("为什么要写日记？", "写日记可以记录生活、整理思绪，也能锻炼观察力和表达能力。多年后翻看，还能看到自己的成长。"),
    ("指南针为什么总是指向南北？", "地球本身像一块巨大的磁铁，指南针的磁针受到地磁场的作用，就会转到南北方向停下来。"),
    ("什么是四舍五入？", "四舍五入是一种取近似数的方法：要保留的那一位后面的数字小于五就舍去，大于或等于五就向前一位进一。"),
    ("为什么吃饭要细嚼慢咽？", "细嚼慢咽能把食物嚼得更碎，减轻肠胃的负担，也让大脑有时间接收吃饱的信号，避免吃得过多。"),
    ("端午节有哪些习俗？", "端午节常见的习俗有吃粽子、赛龙舟、挂艾草和佩戴香囊，传说与纪念诗人屈原有关。"),
    ("什么是温室效应？", "大气中的二氧化碳等气体像温室的玻璃一样，让太阳的热量进来却不容易散出去，使地球表面温度升高，这就是温室效应。"),
    ("蚂蚁是怎么找到回家的路的？", "蚂蚁走路时会留下一种叫信息素的气味，同伴和自己都能顺着气味找到路线，有的蚂蚁还会借助太阳的位置辨认方向。"),
]

# (template, operator name, function); a and b are drawn with the seeded RNG.
ARITHMETIC_TEMPLATES = [
    ("计算{a}加{b}等于多少。", lambda a, b: f"{a}加{b}等于{a + b}。"),
    ("{a}减去{b}是多少？", lambda a, b: f"{a}减去{b}等于{a - b}。"),
    ("请算一下{a}乘以{b}。", lambda a, b: f"{a}乘以{b}等于{a * b}。"),
    ("小明有{a}个苹果，妈妈又给了他{b}个，他现在一共有多少个苹果？",
     lambda a, b: f"小明原来有{a}个，又得到{b}个，{a}加{b}等于{a + b}，所以他现在一共有{a + b}个苹果。"),
    ("一个长方形的长是{a}厘米，宽是{b}厘米，它的面积是多少？",
     lambda a, b: f"长方形的面积等于长乘以宽，{a}乘以{b}等于{a * b}，所以面积是{a * b}平方厘米。"),
    ("书架上有{a}本书，借走了{b}本，还剩多少本？",
     lambda a, b: f"用原有的数量减去借走的数量：{a}减{b}等于{a - b}，书架上还剩{a - b}本书。"),
    ("每盒铅笔有{b}支，{a}盒一共有多少支？",
     lambda a, b: f"每盒{b}支，共{a}盒，{a}乘以{b}等于{a * b}，一共有{a * b}支铅笔。"),
]

TRANSLATION_PAIRS = [
    ("今天天气很好，我们去公园散步吧。", "The weather is nice today, let's take a walk in the park."),
    ("我每天早上七点起床。", "I get up at seven every morning."),
    ("这本书非常有意思，我已经读了两遍。", "This book is very interesting; I have already read it twice."),
    ("请问去火车站怎么走？", "Excuse me, how do I get to the train station?"),
    ("他的中文说得越来越好了。", "His Chinese is getting better and better."),
    ("我们明天下午三点开会。", "We have a meeting at three tomorrow afternoon."),
    ("这家饭馆的面条很好吃。", "The noodles at this restaurant are delicious."),
    ("学习一门新语言需要耐心。", "Learning a new language takes patience."),
    ("周末我喜欢和家人一起做饭。", "On weekends I like to cook with my family."),
    ("外面下雨了，记得带伞。", "It is raining outside, remember to take an umbrella."),
    ("她是一位很受欢迎的老师。", "She is a very popular teacher."),
    ("这个问题比我想象的要复杂。", "This problem is more complicated than I thought."),
    ("春节是中国最重要的传统节日。", "The Spring Festival is the most important traditional festival in China."),
    ("我的电脑坏了，需要修理。", "My computer is broken and needs to be repaired."),
    ("谢谢你的帮助，我非常感激。", "Thank you for your help, I really appreciate it."),
    ("图书馆晚上十点关门。", "The library closes at ten in the evening."),
    ("多运动对身体有好处。", "Exercising more is good for your health."),
    ("我们应该节约用水。", "We should save water."),
    ("他坐飞机去上海出差了。", "He flew to Shanghai on a business trip."),
    ("这条河从城市中间穿过。", "This river runs through the middle of the city."),
    ("孩子们在操场上踢足球。", "The children are playing football on the playground."),
    ("我想预订一张明天的火车票。", "I would like to book a train ticket for tomorrow."),
]
TRANSLATION_INSTRUCTIONS = ["把下面的句子翻译成英文。", "请将以下中文翻译为英语：", "翻译成英文："]

# (review, positive?, reason)
REVIEWS = [
    ("快递很快，包装也很结实，东西和描述的一样。", True, "评论称赞了物流速度、包装和商品质量。"),
    ("用了两天就坏了，客服也不理人，太失望了。", False, "评论提到商品很快损坏，并且对客服不满。"),
    ("这家店的咖啡香气浓郁，环境安静，适合看书。", True, "评论肯定了咖啡的味道和店内环境。"),
    ("电影情节拖沓，看到一半我就睡着了。", False, "评论认为情节拖沓，观看体验很差。"),
    ("老师讲课生动有趣，孩子每次都盼着上课。", True, "评论表达了对老师讲课方式的认可。"),
    ("房间有股霉味，隔音也很差，晚上根本睡不好。", False, "评论指出房间有异味且隔音差。"),
    ("价格实惠，分量十足，下次还会再来。", True, "评论认为性价比高，并表示愿意再次光顾。"),
    ("衣服洗了一次就缩水变形了。", False, "评论反映衣服质量有问题。"),
    ("这款耳机音质清晰，戴久了耳朵也不疼。", True, "评论称赞了音质和佩戴舒适度。"),
    ("排队等了一个小时，菜还是凉的。", False, "评论抱怨等待时间长，菜品温度不够。"),
    ("司机师傅很热情，还帮我把行李搬上了楼。", True, "评论对司机的服务态度表示满意。"),
    ("说明书写得含糊不清，装了半天也没装好。", False, "评论对说明书不满，安装体验差。"),
    ("景色非常美，空气清新，很适合带家人来玩。", True, "评论赞美了景色和空气，并推荐家庭出游。"),
    ("手机电池不耐用，半天就要充一次电。", False, "评论指出电池续航短。"),
    ("这本小说的结局出人意料，让我回味了很久。", True, "评论表示结局精彩，印象深刻。"),
    ("快递员没打电话就把包裹放在门口，结果丢了。", False, "评论对快递服务不满，包裹丢失。"),
    ("医生非常耐心，详细解答了我所有的问题。", True, "评论肯定了医生的耐心和专业。"),
    ("网站经常打不开，付款时还出错。", False, "评论反映网站不稳定，付款出现问题。"),
    ("面包松软香甜，孩子一口气吃了两个。", True, "评论称赞面包口感好，孩子喜欢。"),
    ("空调噪音太大，吵得人心烦。", False, "评论抱怨空调噪音大。"),
    ("课程安排合理，练习题难度适中，收获很大。", True, "评论认可课程设计，认为很有收获。"),
    ("鞋子磨脚，穿了一天脚后跟全是水泡。", False, "评论指出鞋子不舒适。"),
]
SENTIMENT_INSTRUCTIONS = [
    "判断下面这条评论的情感是正面还是负面，并说明理由。",
    "请分析这段顾客评价的情感倾向。",
]

# (paragraph, summary)
PARAGRAPHS = [
    ("城市公园是市民休闲的重要场所。早晨，老人们在这里打太极拳；白天，孩子们在草地上奔跑嬉戏；傍晚，年轻人结伴跑步。公园里的树木还能净化空气、降低噪音，让城市变得更加宜居。",
     "城市公园为不同年龄的市民提供休闲空间，并改善城市环境。"),
    ("近年来，越来越多的人选择骑自行车上下班。骑车既能锻炼身体，又不会排放尾气，在短距离出行中往往比开车更快。许多城市也修建了专门的自行车道，让骑行更加安全。",
     "骑自行车通勤健康环保，城市也在建设自行车道来支持骑行。"),
    ("阅读是获取知识的重要途径。通过阅读，人们可以了解不同的历史和文化，学习新的技能，还能提高思考和表达能力。专家建议每天至少安排半小时安静地读书。",
     "阅读能增长知识、提升能力，建议每天坚持读书。"),
    ("小王刚开始学习做饭时，常常把菜炒糊。他没有放弃，而是每天看菜谱、向妈妈请教，并记录每次的火候和调料用量。三个月后，他已经能独立做出一桌丰盛的晚餐。",
     "小王通过坚持练习和请教，三个月内学会了做饭。"),
    ("茶文化在中国有着悠久的历史。人们不仅把茶当作饮品，还把泡茶、品茶视为修身养性的方式。不同地区形成了各具特色的饮茶习惯，例如广东的早茶和四川的盖碗茶。",
     "中国茶文化历史悠久，各地形成了不同的饮茶习惯。"),
    ("这次社区志愿活动共有五十多名居民参加。大家分成几组，有的清理楼道杂物，有的修剪花草，有的为独居老人送去生活用品。活动结束后，社区面貌焕然一新。",
     "五十多名居民参加志愿活动，改善了社区环境并帮助了老人。"),
    ("智能手机给生活带来了很多便利，人们可以随时付款、导航和视频通话。但是，长时间看手机也会导致视力下降、睡眠不足，甚至影响面对面的交流。合理安排使用时间十分重要。",
     "智能手机既方便生活又有负面影响，需要合理控制使用时间。"),
    ("今年夏天，这座城市遭遇了持续高温。气象部门发布了高温预警，提醒市民减少午后外出，注意防暑降温。多家商场和图书馆开放为纳凉点，供市民免费休息。",
     "城市持续高温，有关部门发布预警并开放纳凉点。"),
    ("学校组织学生参观了科技馆。同学们在展厅里亲手操作实验装置，观看了机器人表演，还听了一场关于太空探索的讲座。很多学生表示，这次参观让他们对科学产生了更大的兴趣。",
     "学生参观科技馆，通过动手实验和讲座增加了对科学的兴趣。"),
    ("种菜看似简单，其实需要不少学问。要根据季节选择合适的品种，掌握浇水的时间和分量，还要及时除草、防治病虫害。只有细心照料，才能收获新鲜的蔬菜。",
     "种菜需要选对品种并细心照料，才能有好收成。"),
    ("古代的驿站是传递公文和供官员休息的地方。驿卒骑马接力，把紧急文书一站一站送往远方。驿站制度保证了消息的传递，对国家管理起到了重要作用。",
     "古代驿站通过接力传递公文，对国家管理很重要。"),
    ("一家小书店为了吸引读者，每周举办读书分享会，还开设了儿童阅读角和咖啡区。店主说，书店不只是卖书的地方，更是人们交流思想的空间。如今，这家书店已经成为附近居民最喜欢去的地方之一。",
     "小书店通过举办活动和打造交流空间，受到附近居民喜爱。"),
]
SUMMARY_INSTRUCTIONS = ["用一句话概括下面这段话的主要内容。", "请为以下文字写一个简短的摘要。"]

# (theme, poem)
POEMS = [
    ("春天", "春风轻轻吹过山岗，\n桃花笑着换上新装。\n小燕子衔来一串歌，\n田野里种下绿色的希望。"),
    ("大海", "大海铺开蓝色的信纸，\n浪花在上面写诗。\n海鸥读懂了每一个字，\n把远方带回岸边。"),
    ("月亮", "月亮挂在窗前，\n像一盏不说话的灯。\n它照着回家的路，\n也照着想家的人。"),
    ("秋天", "秋天把树叶染成金黄，\n稻谷弯腰向大地致谢。\n风从田埂上走过，\n带走了一整季的忙碌。"),
    ("雨", "雨点敲着屋檐，\n像在弹一首老歌。\n小路上开出雨伞的花，\n一朵朵走向远方。"),
    ("友谊", "友谊是一杯温水，\n不烫手，也不冷。\n在你口渴的时候，\n它总在身边。"),
    ("故乡", "故乡是村口那棵老槐树，\n是灶台上升起的炊烟。\n走得再远，\n梦里也能闻到饭香。"),
    ("星空", "夜空撒满碎银，\n每一颗都在眨眼。\n我数着数着睡着了，\n星星也轻轻合上眼。"),
    ("冬天", "雪花落在屋顶上，\n世界安静得像一张白纸。\n孩子们堆起雪人，\n给冬天画上笑脸。"),
    ("时间", "时间是一条小河，\n从指缝间悄悄流走。\n抓不住它的时候，\n就陪它好好走一程。"),
]
POEM_INSTRUCTIONS = ["写一首关于{theme}的短诗。", "以“{theme}”为题，写一首四行小诗。"]

# (task, steps)
HOWTO = [
    ("煮一碗鸡蛋面", ["锅中加水烧开。", "放入面条，用筷子搅散，煮约三分钟。", "打入一个鸡蛋，小火煮到蛋白凝固。", "加入盐、酱油和青菜，再煮一分钟即可出锅。"]),
    ("养好一盆绿萝", ["把绿萝放在明亮但没有阳光直射的地方。", "等盆土表面干了再浇水，一次浇透。", "每个月施一次稀释的液体肥料。", "定期剪掉发黄的叶子，保持通风。"]),
    ("准备一次面试", ["了解招聘单位的业务和岗位要求。", "整理自己的经历，准备几个能说明能力的具体例子。", "提前练习常见问题的回答。", "面试当天提前到达，穿着整洁得体。"]),
    ("整理一个凌乱的书桌", ["先把桌面上所有东西拿下来。", "把物品分成常用、不常用和要扔掉三类。", "擦干净桌面。", "只把常用物品放回桌面，其他放进抽屉或收纳盒。"]),
    ("制定一份学习计划", ["明确想要达到的目标和期限。", "把目标拆分成每周和每天的小任务。", "为每项任务安排固定时间。", "每周检查进度并及时调整计划。"]),
    ("泡一杯绿茶", ["把水烧开后放置片刻，让水温降到八十度左右。", "在杯中放入适量茶叶。", "先倒少量水润茶，再注水至七分满。", "等两三分钟，茶叶舒展后即可饮用。"]),
    ("安全地过马路", ["走人行横道，看清交通信号灯。", "绿灯亮时先左右看，确认车辆已停下。", "快步通过，不要边走边看手机。", "不要在车辆之间穿行。"]),
    ("给自行车打气", ["确认轮胎的气门类型，选择合适的打气筒接头。", "拧下气门帽，把接头套紧在气门上。", "按照轮胎侧面标注的气压打气。", "取下接头，拧回气门帽。"]),
    ("写一封感谢信", ["开头写明收信人的称呼。", "说明要感谢的具体事情。", "表达这件事对自己的帮助和意义。", "结尾再次致谢，并写上署名和日期。"]),
    ("做一份水果沙拉", ["选择几种颜色不同的新鲜水果，洗净。", "去皮去核，切成大小相近的小块。", "放入大碗中，加入酸奶或少许蜂蜜。", "轻轻拌匀，冷藏十分钟口感更好。"]),
    ("培养早起的习惯", ["每天固定时间上床，保证睡眠充足。", "把闹钟放在需要起身才能关掉的地方。", "每次只比前一天提前十五分钟起床。", "起床后先喝一杯水，打开窗帘让阳光进来。"]),
    ("清洗运动鞋", ["取下鞋带和鞋垫，分开清洗。", "用软刷蘸取温水和洗涤剂刷洗鞋面。", "用清水冲净泡沫。", "塞入纸巾吸水，放在阴凉通风处晾干。"]),
    ("组织一次班级郊游", ["和同学商量确定时间和地点。", "提前查看天气预报，准备雨具。", "分工负责交通、食物和急救用品。", "出发前强调安全注意事项，并清点人数。"]),
    ("背诵一首古诗", ["先理解诗句的意思和诗人表达的感情。", "有感情地朗读几遍。", "分句记忆，再连起来背。", "第二天和一周后再复习一次，加深记忆。"]),
    ("节约家里的用电", ["离开房间时随手关灯。", "电器不用时拔掉插头。", "空调温度夏天设在二十六度左右。", "选择有节能标识的家电。"]),
    ("学会骑自行车", ["先调低车座，让双脚能踩到地面。", "练习用脚蹬地滑行，找到平衡感。", "平衡稳定后再把脚放上脚踏板慢慢骑。", "熟练后练习转弯和刹车。"]),
    ("包饺子", ["和面并醒半小时，同时调好肉馅。", "把面团搓成长条，切成小剂子，擀成圆皮。", "在面皮中间放馅，对折捏紧边缘。", "水开后下锅，煮到饺子浮起再加两次冷水即可。"]),
    ("给朋友挑选生日礼物", ["回想朋友最近的爱好和需要。", "确定自己的预算。", "挑选实用或有纪念意义的物品。", "附上一张亲手写的祝福卡片。"]),
]
HOWTO_INSTRUCTIONS = ["如何{task}？请分步骤说明。", "请告诉我{task}的方法。"]

# (casual sentence, formal rewrite)
REWRITES = [
    ("明天的会我去不了，有点事。", "非常抱歉，因有要事在身，我无法出席明天的会议。"),
    ("这东西太贵了，便宜点呗。", "这件商品的价格超出了我的预算，请问能否给予一些优惠？"),
    ("你那个报告写得挺好的。", "您撰写的报告内容翔实、条理清晰，令人印象深刻。"),
    ("我觉得这个方案不太行。", "经过考虑，我认为这个方案还存在一些需要改进的地方。"),
    ("快点把文件发我。", "麻烦您尽快将文件发送给我，谢谢。"),
    ("这事我搞不定，你帮帮忙。", "这件事超出了我的能力范围，希望能得到您的协助。"),
    ("饭菜一般般，服务还行。", "饭菜的口味较为普通，服务总体令人满意。"),
    ("下周放假，大家别忘了。", "特此提醒各位，下周为放假时间，请提前做好安排。"),
    ("电脑又卡了，烦死了。", "电脑再次出现运行缓慢的问题，影响了工作效率。"),
    ("他迟到好几回了。", "他已经多次未能按时到岗。"),
    ("这个地方挺好玩的，推荐去。", "这个景点很有特色，值得一游，特此推荐。"),
    ("钱我下个月还你。", "借款我将于下个月归还，感谢您的理解。"),
    ("大家辛苦了，活干得不错。", "感谢各位的辛勤付出，本次工作完成得十分出色。"),
    ("这周末加班，没办法。", "由于工作需要，本周末需要加班，敬请谅解。"),
]
REWRITE_INSTRUCTIONS = ["把下面的句子改写得更正式、更礼貌。", "请用书面语改写这句话："]

# (category, items); the record lists three of the items, chosen with the seeded RNG.
LIST_CATEGORIES = [
    ("常见的水果", ["苹果", "香蕉", "橙子", "葡萄", "西瓜", "草莓", "梨", "桃子"]),
    ("中国的传统节日", ["春节", "元宵节", "清明节", "端午节", "中秋节", "重阳节", "七夕节"]),
    ("可以在家做的运动", ["跳绳", "俯卧撑", "仰卧起坐", "瑜伽", "深蹲", "平板支撑"]),
    ("乐器", ["钢琴", "小提琴", "二胡", "古筝", "笛子", "吉他", "琵琶"]),
    ("哺乳动物", ["大象", "老虎", "海豚", "蝙蝠", "鲸鱼", "兔子", "猴子"]),
    ("中国的名山", ["泰山", "黄山", "华山", "峨眉山", "庐山", "武当山"]),
    ("绿色蔬菜", ["菠菜", "西兰花", "芹菜", "生菜", "油菜", "黄瓜"]),
    ("交通工具", ["自行车", "公交车", "地铁", "火车", "飞机", "轮船"]),
    ("四大名著中的人物", ["孙悟空", "林黛玉", "诸葛亮", "宋江", "猪八戒", "贾宝玉", "关羽"]),
    ("学习用品", ["铅笔", "橡皮", "尺子", "笔记本", "书包", "文具盒"]),
]
LIST_INSTRUCTIONS = ["列出三种{category}。", "请举出三个{category}的例子。"]

# ---------------------------------------------------------------------------
# Long records. Some responses, and some prompts, are longer than the demo's
# --max_seq_length (256 tokens of the tiny tokenizer), so the example exercises the
# upstream's right truncation, including samples whose labels are all -100.
# ---------------------------------------------------------------------------

LONG_ESSAY_TOPICS = ["自然现象", "健康生活", "中国传统文化", "日常科学常识"]


def long_essay_record(topic, paragraphs):
    body = "\n\n".join(paragraphs)
    return {
        "instruction": f"请围绕“{topic}”写一篇详细的介绍，分几段说明。",
        "input": "",
        "output": f"下面从几个方面介绍{topic}。\n\n{body}\n\n以上就是关于{topic}的一些介绍，希望对你有帮助。",
    }


def long_input_record(paragraphs):
    article = "".join(p for p, _ in paragraphs)
    summary = "".join(s for _, s in paragraphs)
    return {
        "instruction": "阅读下面的长篇材料，概括其中讲到的几件事。",
        "input": article,
        "output": summary,
    }


def numbered(steps):
    return "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))


def build_records(rng):
    """Return (records without input, records with input); each list mixes lengths."""
    plain, with_input = [], []

    for question, answer in KNOWLEDGE_QA:
        plain.append({"instruction": question, "input": "", "output": answer})

    for template, answer in ARITHMETIC_TEMPLATES:
        for _ in range(7):
            a, b = rng.randint(12, 95), rng.randint(2, 11)
            plain.append({"instruction": template.format(a=a, b=b), "input": "", "output": answer(a, b)})

    for theme, poem in POEMS:
        for template in POEM_INSTRUCTIONS:
            plain.append({"instruction": template.format(theme=theme), "input": "", "output": poem})

    for task, steps in HOWTO:
        template = HOWTO_INSTRUCTIONS[rng.randrange(len(HOWTO_INSTRUCTIONS))]
        output = f"可以按下面的步骤来做：\n{numbered(steps)}"
        plain.append({"instruction": template.format(task=task), "input": "", "output": output})

    for category, items in LIST_CATEGORIES:
        for template in LIST_INSTRUCTIONS:
            chosen = rng.sample(items, 3)
            plain.append({"instruction": template.format(category=category), "input": "",
                          "output": f"例如：{'、'.join(chosen)}。"})

    for zh, en in TRANSLATION_PAIRS:
        instruction = TRANSLATION_INSTRUCTIONS[rng.randrange(len(TRANSLATION_INSTRUCTIONS))]
        with_input.append({"instruction": instruction, "input": zh, "output": en})

    for review, positive, reason in REVIEWS:
        instruction = SENTIMENT_INSTRUCTIONS[rng.randrange(len(SENTIMENT_INSTRUCTIONS))]
        label = "正面" if positive else "负面"
        with_input.append({"instruction": instruction, "input": review, "output": f"{label}。{reason}"})

    for paragraph, summary in PARAGRAPHS:
        instruction = SUMMARY_INSTRUCTIONS[rng.randrange(len(SUMMARY_INSTRUCTIONS))]
        with_input.append({"instruction": instruction, "input": paragraph, "output": summary})

    for casual, formal in REWRITES:
        instruction = REWRITE_INSTRUCTIONS[rng.randrange(len(REWRITE_INSTRUCTIONS))]
        with_input.append({"instruction": instruction, "input": casual, "output": formal})

    answers = [answer for _, answer in KNOWLEDGE_QA]
    for i, topic in enumerate(LONG_ESSAY_TOPICS):
        plain.append(long_essay_record(topic, answers[i * 11:(i + 1) * 11]))
    with_input.append(long_input_record(PARAGRAPHS[:6]))
    with_input.append(long_input_record(PARAGRAPHS[6:]))

    return plain, with_input


def split_validation(records, every):
    """Take every `every`-th record (after a seeded shuffle) out for validation."""
    train = [r for i, r in enumerate(records) if i % every != every - 1]
    validation = [r for i, r in enumerate(records) if i % every == every - 1]
    return train, validation


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DATA_DIR,
                        help="folder that receives sft/*.json and validation.json (default: this folder)")
    args = parser.parse_args()

    rng = random.Random(SEED)
    plain, with_input = build_records(rng)
    rng.shuffle(plain)
    rng.shuffle(with_input)
    plain_train, plain_validation = split_validation(plain, every=10)
    input_train, input_validation = split_validation(with_input, every=10)

    write_json(args.output / "sft" / "general_instructions.json", plain_train)
    write_json(args.output / "sft" / "tasks_with_input.json", input_train)
    write_json(args.output / "validation.json", plain_validation + input_validation)
    print(f"train: {len(plain_train)} + {len(input_train)} records, validation: "
          f"{len(plain_validation) + len(input_validation)} records, written under {args.output}")


if __name__ == "__main__":
    main()
